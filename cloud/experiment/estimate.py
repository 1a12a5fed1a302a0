"""``fedcmd experiment --dry-run``'s time estimate: two rounds of one cell per dataset, timed here, scaled
to every cell still to run by its rounds and its work per round (clients per round x local epochs)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

CALIBRATION_ROUNDS = 2


@dataclass
class Calibration:
    dataset: str
    algo: str
    setup_s: float  # data, partition and model, before the first round
    round_s: float  # the last calibration round (the first one warms caches up)
    work: float  # clients per round x local epochs of the calibrated cell


@dataclass
class Estimate:
    cells: int
    workers: int
    total_s: float  # one process, one cell after another
    wall_s: float
    calibrations: list[Calibration] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # dataset -> why its calibration run failed
    unestimated: int = 0  # cells of those datasets, left out of the figures

    def describe(self) -> str:
        if not self.calibrations:
            return f"no estimate: every calibration run failed ({self._failures()})"
        return self._describe() + (f" Not estimated: {self.unestimated} cell(s) whose calibration failed "
                                   f"({self._failures()})." if self.failed else "")

    def _failures(self) -> str:
        return "; ".join(f"{ds}: {why}" for ds, why in self.failed.items())

    def _describe(self) -> str:
        per = "; ".join(f"{c.dataset}: {c.round_s:.2f} s/round ({c.algo}), setup {c.setup_s:.1f} s"
                        for c in self.calibrations)
        return (f"estimate: {_hms(self.wall_s)} for {self.cells} cells with {self.workers} parallel job(s) "
                f"({_hms(self.total_s)} one after another); calibrated here on {per}. Algorithms differ in cost "
                "(e.g. fedfomo evaluates peer models), so read it as a guide within about 2x.")


def _hms(seconds: float) -> str:
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def _work(cfg: Any) -> float:
    clients = max(1, math.ceil(cfg.client_num * cfg.join_ratio))
    return float(clients * max(1, cfg.local_epoch))


def calibrate(values: dict[str, Any]) -> Calibration:
    """Run ``values`` (a cell) for two rounds in this process, writing nothing, and time it."""
    from cloud.config import resolve
    from cloud.sim.simulate import build_and_run

    short = {**values, "global_epoch": CALIBRATION_ROUNDS, "test_gap": 0, "out": None, "save_log": False,
             "save_fig": False, "save_metrics": False, "save_model": False}
    cfg = resolve(short, {})
    started = time.perf_counter()
    marks: dict[str, float] = {}
    rounds: list[float] = []

    def on_start(total: int) -> None:
        marks["setup"] = time.perf_counter() - started

    def on_round(record: Any) -> None:
        rounds.append(float(record.seconds))

    build_and_run(cfg, on_round=on_round, on_start=on_start)
    return Calibration(cfg.dataset, cfg.algo, marks.get("setup", 0.0), rounds[-1] if rounds else 0.0,
                       _work(cfg))


def estimate_grid(todo: list[Any], jobs: int, console: Console | None = None) -> Estimate:
    """The time the cells ``todo`` will take with ``jobs`` parallel processes (at most one per core helps)."""
    from cloud.config import resolve

    calibrations: dict[str, Calibration] = {}
    failed: dict[str, str] = {}
    total = 0.0
    estimated = 0
    for cell in todo:
        cfg = resolve(dict(cell.values), {})
        if cfg.dataset not in calibrations and cfg.dataset not in failed:
            if console is not None:
                console.print(f"calibrating: {CALIBRATION_ROUNDS} rounds of {cell.key} ...", highlight=False)
            try:
                calibrations[cfg.dataset] = calibrate(dict(cell.values))
            except Exception as e:  # the cell itself would fail the same way; the others still get a figure
                failed[cfg.dataset] = " ".join(str(e).split())[:200] or type(e).__name__
        c = calibrations.get(cfg.dataset)
        if c is None:
            continue
        estimated += 1
        total += c.setup_s + cfg.global_epoch * c.round_s * (_work(cfg) / c.work)
    workers = max(1, min(jobs, os.cpu_count() or 1, max(1, estimated)))
    return Estimate(estimated, workers, total, total / workers, list(calibrations.values()), failed,
                    len(todo) - estimated)
