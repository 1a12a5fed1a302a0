"""Reading finished runs for ``fedcmd compare``: run folders found recursively, the algorithm variant and
every hyper-parameter that differs between them as columns, tables as text, CSV or JSON, curves overlaid.
Nothing read is trusted: sizes are bounded and a folder that is not a run folder is skipped with a reason."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 16 * 2**20
MAX_RUNS = 10_000
# config.json fields that never tell two runs' settings apart (paths, output and display options)
NOT_SETTINGS = {"out", "root", "partition", "checkpoint", "state_dir", "provenance", "verbose_gap", "save_log",
                "save_model", "save_fig", "save_metrics", "visible", "visible_host", "visible_port", "visible_keep",
                "tensorboard", "workers", "threads", "download", "external_model_params_file"}
# Colours and line styles for overlaid curves: 10 colours x 4 styles = 40 distinct lines.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#8C564B", "#7F7F7F",
           "#BCBD22"]
LINESTYLES = ["-", "--", ":", "-."]


class ResultsError(ValueError):
    """Nothing to compare, or a file that cannot be read; one line."""


@dataclass
class Run:
    folder: Path
    summary: dict[str, Any]
    config: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)  # flat: field -> value, hp.<key> -> value

    @property
    def variant(self) -> str:
        strat = self.summary.get("strategy") or {}
        parts = [str(strat[k]) for k in ("variant", "body_mode") if isinstance(strat, dict) and strat.get(k)]
        return "/".join(parts) or "-"


def _read_json(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ResultsError(f"{path} is larger than {MAX_JSON_BYTES // 2**20} MiB")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ResultsError(f"{path} does not hold a JSON object")
    return data


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key in NOT_SETTINGS:
            continue
        if key == "hp" and isinstance(value, dict):
            out.update({f"hp.{k}": v for k, v in value.items()})
        elif isinstance(value, (dict, list)):
            out[key] = json.dumps(value, sort_keys=True)
        else:
            out[key] = value
    return out


def find_runs(paths: list[Path]) -> tuple[list[Run], list[str]]:
    """Every run folder (one holding summary.json) at or below ``paths``, in a stable order; plus a reason for
    each path that held none. Hidden folders (a run being written) are skipped."""
    runs: list[Run] = []
    skipped: list[str] = []
    seen: set[Path] = set()
    for top in paths:
        if not top.exists():
            raise ResultsError(f"{top} does not exist")
        found = [top / "summary.json"] if (top / "summary.json").is_file() else sorted(
            p for p in top.rglob("summary.json") if not any(part.startswith(".") for part in p.relative_to(top).parts))
        if not found:
            skipped.append(f"{top}: no run folder (no summary.json) in it")
        for path in found:
            folder = path.parent.resolve()
            if folder in seen:
                continue
            seen.add(folder)
            if len(runs) >= MAX_RUNS:
                raise ResultsError(f"more than {MAX_RUNS} runs; give fewer folders")
            summary = _read_json(path)
            config = _read_json(path.parent / "config.json") if (path.parent / "config.json").is_file() else {}
            runs.append(Run(path.parent, summary, config, _flatten(config)))
    if not runs:
        raise ResultsError("no run folders found: " + "; ".join(skipped))
    return runs, skipped


def differing(runs: list[Run]) -> list[str]:
    """The settings whose values are not the same in every run (algo and dataset have their own columns)."""
    keys = sorted({k for r in runs for k in r.settings} - {"algo", "dataset"})
    missing = object()
    return [k for k in keys if len({json.dumps(r.settings.get(k, missing) if r.settings.get(k, missing)
                                               is not missing else "<unset>", default=str) for r in runs}) > 1]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def rows(runs: list[Run]) -> tuple[list[str], list[dict[str, Any]]]:
    """The comparison as columns and one dict per run (numbers stay numbers)."""
    diff = differing(runs)
    columns = ["run", "algo", "variant", "dataset", *diff, "paper_metric", "final_personalized_acc", "chosen_layer",
               "rounds", "mib_down", "mib_up", "seconds"]
    out = []
    for r in runs:
        s = r.summary
        strat = s.get("strategy") if isinstance(s.get("strategy"), dict) else {}
        row: dict[str, Any] = {
            "run": str(r.folder), "algo": s.get("algo"), "variant": r.variant, "dataset": s.get("dataset"),
            **{k: r.settings.get(k) for k in diff},
            "paper_metric": _num(s.get("paper_metric")),
            "final_personalized_acc": _num(s.get("final_personalized_acc")),
            "chosen_layer": strat.get("chosen_layer"), "rounds": s.get("rounds"),
            "mib_down": _num(s.get("bytes_down", 0) / 2**20) if _num(s.get("bytes_down")) is not None else None,
            "mib_up": _num(s.get("bytes_up", 0) / 2**20) if _num(s.get("bytes_up")) is not None else None,
            "seconds": _num(s.get("seconds")),
        }
        out.append(row)
    return columns, out


def to_csv(columns: list[str], table: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in table:
        w.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return buf.getvalue()


def to_json(columns: list[str], table: list[dict[str, Any]]) -> str:
    return json.dumps({"columns": columns, "runs": table}, indent=2, default=str) + "\n"


def curve(folder: Path, key: str = "test_before_acc") -> list[tuple[int, float]]:
    path = folder / "metrics.csv"
    if not path.is_file():
        return []
    points = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            try:
                points.append((int(r["round"]), float(r[key])))
            except (KeyError, TypeError, ValueError):
                continue
    return points


def line_style(i: int) -> tuple[str, str]:
    """A colour and a line style: distinct for the first len(PALETTE) * len(LINESTYLES) lines."""
    return PALETTE[i % len(PALETTE)], LINESTYLES[(i // len(PALETTE)) % len(LINESTYLES)]


def plot(runs: list[Run], labels: list[str], path: Path, window: int = 10) -> None:
    """Curves of test accuracy before local training, overlaid, the paper window shaded, the legend outside."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    longest = 0
    for i, (run, label) in enumerate(zip(runs, labels)):
        points = curve(run.folder)
        if not points:
            continue
        colour, style = line_style(i)
        ax.plot([p[0] for p in points], [p[1] for p in points], color=colour, linestyle=style, label=label)
        longest = max(longest, points[-1][0])
    if longest > window:
        ax.axvspan(longest - window + 0.5, longest + 0.5, color="0.92", zorder=0, label=f"last {window} rounds")
    ax.set(xlabel="round", ylabel="test accuracy before local training (%)")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise ResultsError(f"--plot {path}: {e.strerror or e}") from None
