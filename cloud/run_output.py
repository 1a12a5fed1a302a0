"""The one run-folder writer of ``simulate``, ``experiment`` and ``cloud serve``: resolved config,
metrics.csv, summary.json, accuracy.png, run.log, model.safetensors; the same files and columns for all three.

Its rows come from the coordinator's event stream (``RunRecorder`` is a subscriber, as the dashboard and
Prometheus are), so what a run folder says and what was watched live are the same records. ``simulate``
writes into a hidden temporary folder beside the destination, renamed into place at the end, so a failed or
interrupted run never leaves a half-written run folder behind.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cloud.config import ConfigError, RunConfig, recorded_config
from cloud.monitor import events as ev
from cloud.provenance import command_without_out
from fedcmd_core.state_tree import DiskError

METRIC_COLUMNS = [
    "test_before_acc",
    "test_before_loss",
    "test_after_acc",
    "test_after_loss",
    "train_before_acc",
    "train_before_loss",
    "train_after_acc",
    "train_after_loss",
    "all_test_before_acc",
    "all_test_after_acc",
]
# The only wall-clock values of a run folder (besides run.log's timestamps): two runs of the same command
# agree byte for byte on everything else in metrics.csv and summary.json (README, "Run folder").
WALL_CLOCK_COLUMNS = ("seconds",)  # metrics.csv
WALL_CLOCK_FIELDS = ("seconds", "seconds_per_round")  # summary.json, top level
CSV_HEADER = ["round", "phase", "sampled", "answered", *METRIC_COLUMNS, "bytes_down", "bytes_up", *WALL_CLOCK_COLUMNS]
PAPER_WINDOW = 10  # rounds the paper metric averages
PAPER_METRIC_DEFINITION = (f"mean over the last {PAPER_WINDOW} rounds of the pooled test accuracy (%) of that "
                           "round's clients before local training")


def paper_metric(records: Sequence[Any], last: int = PAPER_WINDOW) -> float:
    """The paper's headline number: mean over the last ``last`` rounds of test accuracy before training."""
    values = [r.metrics["test_before_acc"] for r in list(records)[-last:] if "test_before_acc" in r.metrics]
    return float(np.mean(values)) if values else float("nan")


class RunResult(Protocol):
    """What a finished run hands the writer (``SimulationResult`` and ``RunRecorder`` both are one)."""

    records: list[Any]
    final: dict[str, float]
    strategy_summary: dict[str, Any]
    rejected: dict[str, int]
    clipped: int
    seconds: float
    attackers: list[int]
    global_arrays: dict[str, np.ndarray]


@dataclass
class RunRecorder:
    """An event-stream subscriber that keeps what the run folder is written from (subscribe it critical)."""

    records: list[Any] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    strategy_summary: dict[str, Any] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    clipped: int = 0
    seconds: float = 0.0
    attackers: list[int] = field(default_factory=list)
    global_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    finished: bool = False

    def __call__(self, event: Any) -> None:
        if isinstance(event, ev.RunStarted):
            self.records = list(event.history)  # a resumed run: the rounds before the restart
        elif isinstance(event, ev.RoundClosed):
            self.records.append(event.record)
            self.rejected = dict(event.rejected)
        elif isinstance(event, ev.RunFinished):
            self.final, self.strategy_summary = dict(event.final), dict(event.strategy)
            self.rejected, self.clipped, self.seconds = dict(event.rejected), event.clipped, event.seconds
            self.finished = True


@dataclass
class RunInfo:
    """What the run was, beside its rounds: names for summary.json, config.json's content, which files."""

    algo: str
    dataset: str
    model: str
    seed: int
    clients: int
    fleet: str
    config: dict[str, Any]  # config.json: the resolved configuration (and the provenance, added here)
    provenance: dict[str, Any]
    attack: str | None = None
    attack_scale: float | None = None
    save_metrics: bool = True
    save_log: bool = True
    save_fig: bool = True
    save_model: bool = False

    @classmethod
    def of_simulation(cls, cfg: RunConfig, clients: int, provenance: dict[str, Any], fleet: str = "sim") -> RunInfo:
        return cls(cfg.algo, cfg.dataset, cfg.model, cfg.seed, clients, fleet, json.loads(cfg.model_dump_json()),
                   provenance, cfg.attack, cfg.attack_scale, cfg.save_metrics, cfg.save_log, cfg.save_fig,
                   cfg.save_model)


def capture_log(buffer: io.StringIO) -> logging.Logger:
    """Send every ``fedcmd.*`` log record of this process into ``buffer`` (the run's run.log)."""
    root = logging.getLogger("fedcmd")
    root.handlers.clear()
    root.setLevel(logging.INFO)
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.propagate = False
    return root


def default_out(cfg: RunConfig) -> Path:
    """runs/<algo>/<dataset>/<start time>; a run started in the same second as another gets -2, -3, ...

    (two commands of a script would otherwise collide and the second one refuse a folder its user never named)
    """
    base = Path("runs") / cfg.algo / cfg.dataset / time.strftime("%Y%m%d-%H%M%S")
    out, n = base, 1
    while out.exists() or (out.parent / f".{out.name}.partial").exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def check_out(out: Path, force: bool) -> None:
    """Refuse to overwrite a non-empty folder unless asked; done before any work starts."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConfigError(f"output folder {out} already exists and is not empty; pass --force or choose --out")


@contextmanager
def staged(out: Path, force: bool) -> Iterator[Path]:
    """A temporary folder that becomes ``out`` only if the block finishes. A folder that cannot be
    made or renamed into place is a DiskError; the temporary folder is removed either way."""
    tmp = out.parent / f".{out.name}.partial"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise DiskError(f"--out: cannot create {tmp}: {e.strerror or e}", e.errno) from e
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if out.exists():
            if not force and (not out.is_dir() or any(out.iterdir())):
                shutil.rmtree(tmp, ignore_errors=True)
                raise ConfigError(f"output folder {out} appeared during the run; results not written")
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DiskError(f"--out: cannot move the run folder into place at {out}: {e.strerror or e}", e.errno) from e


def _info(result: Any, info: RunInfo | None) -> RunInfo:
    if info is not None:
        return info
    cfg = getattr(result, "config", None)
    if cfg is None:
        raise ValueError("a run result without a config needs a RunInfo")
    info = RunInfo.of_simulation(cfg, result.partition.num_clients, getattr(result, "provenance", None) or {})
    info.config = recorded_config(cfg, result.partition.num_clients, result.partition.meta)  # what the run used
    return info


def summary(result: RunResult, info: RunInfo | None = None) -> dict[str, Any]:
    i = _info(result, info)
    rounds = result.records
    return {
        "algo": i.algo,
        "dataset": i.dataset,
        "model": i.model,
        "seed": i.seed,
        "fleet": i.fleet,
        "clients": i.clients,
        "rounds": len(rounds),
        "paper_metric": paper_metric(rounds),
        "paper_metric_definition": PAPER_METRIC_DEFINITION,
        "final_personalized_acc": result.final.get("test_before_acc"),
        "final_personalized_loss": result.final.get("test_before_loss"),
        "final_finetuned_acc": result.final.get("test_after_acc"),
        "bytes_down": int(sum(r.bytes_down for r in rounds)),
        "bytes_up": int(sum(r.bytes_up for r in rounds)),
        "seconds": result.seconds,
        "seconds_per_round": float(np.mean([r.seconds for r in rounds])) if rounds else 0.0,
        "rejected_updates": result.rejected,
        "clipped_updates": result.clipped,
        "attackers": {"devices": result.attackers, "attack": i.attack, "scale": i.attack_scale}
        if result.attackers
        else None,
        "strategy": result.strategy_summary,
        "provenance": {**i.provenance, "command": command_without_out(list(i.provenance.get("command") or []))}
        if i.provenance else {},
    }


def write_run(result: RunResult, folder: Path, log_text: str, info: RunInfo | None = None) -> None:
    """Write every file of the run folder; a full or read-only disk is a DiskError (exit 4), not a traceback."""
    try:
        _write_files(result, _info(result, info), folder, log_text)
    except OSError as e:
        where = e.filename or folder
        raise DiskError(f"--out: could not write {where}: {e.strerror or e}", e.errno) from e


def _write_files(result: RunResult, info: RunInfo, folder: Path, log_text: str) -> None:
    config = {**info.config, "provenance": info.provenance}
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    (folder / "summary.json").write_text(json.dumps(summary(result, info), indent=2, default=str) + "\n")
    if info.save_metrics:
        _write_metrics(result.records, folder / "metrics.csv")
    if info.save_log:
        (folder / "run.log").write_text(log_text)
    if info.save_fig:
        _plot(result.records, info, folder / "accuracy.png")
    if info.save_model:
        from safetensors.numpy import save

        # bytes first, then a plain write: a full disk is an OSError like every other file here
        arrays = {k: np.ascontiguousarray(v) for k, v in result.global_arrays.items()}
        blob = save(arrays, metadata={"algo": info.algo, "dataset": info.dataset})
        (folder / "model.safetensors").write_bytes(blob)


def metrics_row(r: Any) -> list[Any]:
    """One round of metrics.csv, in CSV_HEADER's order."""
    values = [_fmt(r.metrics.get(c)) for c in METRIC_COLUMNS]
    sampled = " ".join(str(c) for c in r.clients)
    answered = " ".join(str(c) for c in r.answered)
    return [r.round + 1, r.phase, sampled, answered, *values, r.bytes_down, r.bytes_up, f"{r.seconds:.4f}"]


def _write_metrics(records: Sequence[Any], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_HEADER)
        for r in records:
            w.writerow(metrics_row(r))


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.6f}"


def _plot(records: Sequence[Any], info: RunInfo, path: Path) -> None:
    # The object API without pyplot: no GUI backend machinery, a smaller import at the end of a run.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rounds = [r.round + 1 for r in records]
    fig = Figure(figsize=(9, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label in (("test_before_acc", "before local training"), ("test_after_acc", "after local training")):
        ys = [r.metrics.get(key, np.nan) for r in records]
        ax.plot(rounds, ys, label=label)
    if len(rounds) > PAPER_WINDOW:
        ax.axvspan(rounds[-PAPER_WINDOW] - 0.5, rounds[-1] + 0.5, color="0.9", zorder=0, label="paper metric window")
    ax.set(xlabel="round", ylabel="pooled test accuracy (%)", title=f"{info.algo} on {info.dataset}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # outside: never over the last rounds
    fig.savefig(path, dpi=110)
