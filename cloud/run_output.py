"""Writing a run folder: resolved config, metrics.csv, summary.json, accuracy.png, model.safetensors.

Everything is written into a hidden temporary folder beside the destination and renamed into place
at the end, so a failed or interrupted run never leaves a half-written run folder behind.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cloud.config import ConfigError, RunConfig
from cloud.sim.simulate import SimulationResult
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
    return Path("runs") / cfg.algo / cfg.dataset / time.strftime("%Y%m%d-%H%M%S")


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


def summary(result: SimulationResult) -> dict[str, Any]:
    cfg = result.config
    rounds = result.records
    return {
        "algo": cfg.algo,
        "dataset": cfg.dataset,
        "model": cfg.model,
        "seed": cfg.seed,
        "clients": result.partition.num_clients,
        "rounds": len(rounds),
        "paper_metric": result.paper_metric(),
        "paper_metric_definition": "mean over the last 10 rounds of the pooled test accuracy (%) of that "
        "round's clients before local training",
        "final_personalized_acc": result.final.get("test_before_acc"),
        "final_personalized_loss": result.final.get("test_before_loss"),
        "final_finetuned_acc": result.final.get("test_after_acc"),
        "bytes_down": int(sum(r.bytes_down for r in rounds)),
        "bytes_up": int(sum(r.bytes_up for r in rounds)),
        "seconds": result.seconds,
        "seconds_per_round": float(np.mean([r.seconds for r in rounds])) if rounds else 0.0,
        "rejected_updates": result.rejected,
        "clipped_updates": result.clipped,
        "attackers": {"devices": result.attackers, "attack": cfg.attack, "scale": cfg.attack_scale}
        if result.attackers
        else None,
        "strategy": result.strategy_summary,
    }


def write_run(result: SimulationResult, folder: Path, log_text: str) -> None:
    """Write every file of the run folder; a full or read-only disk is a DiskError (exit 4), not a traceback."""
    try:
        _write_files(result, folder, log_text)
    except OSError as e:
        where = e.filename or folder
        raise DiskError(f"--out: could not write {where}: {e.strerror or e}", e.errno) from e


def _write_files(result: SimulationResult, folder: Path, log_text: str) -> None:
    cfg = result.config
    (folder / "config.json").write_text(cfg.model_dump_json(indent=2) + "\n")
    (folder / "summary.json").write_text(json.dumps(summary(result), indent=2, default=str) + "\n")
    if cfg.save_metrics:
        _write_metrics(result, folder / "metrics.csv")
    if cfg.save_log:
        (folder / "run.log").write_text(log_text)
    if cfg.save_fig:
        _plot(result, folder / "accuracy.png")
    if cfg.save_model:
        from safetensors.numpy import save

        # bytes first, then a plain write: a full disk is an OSError like every other file here
        arrays = {k: np.ascontiguousarray(v) for k, v in result.global_arrays.items()}
        blob = save(arrays, metadata={"algo": cfg.algo, "dataset": cfg.dataset})
        (folder / "model.safetensors").write_bytes(blob)


def _write_metrics(result: SimulationResult, path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "phase", "clients", *METRIC_COLUMNS, "bytes_down", "bytes_up", *WALL_CLOCK_COLUMNS])
        for r in result.records:
            values = [_fmt(r.metrics.get(c)) for c in METRIC_COLUMNS]
            clients = " ".join(str(c) for c in r.clients)
            w.writerow([r.round + 1, r.phase, clients, *values, r.bytes_down, r.bytes_up, f"{r.seconds:.4f}"])


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.6f}"


def _plot(result: SimulationResult, path: Path) -> None:
    # The object API without pyplot: no GUI backend machinery, a smaller import at the end of a run.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rounds = [r.round + 1 for r in result.records]
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label in (("test_before_acc", "before local training"), ("test_after_acc", "after local training")):
        ys = [r.metrics.get(key, np.nan) for r in result.records]
        ax.plot(rounds, ys, label=label)
    cfg = result.config
    ax.set(xlabel="round", ylabel="pooled test accuracy (%)", title=f"{cfg.algo} on {cfg.dataset}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
