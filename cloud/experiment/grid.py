"""``fedcmd experiment GRID.toml``: algorithms x datasets x alpha x seeds, resumable, in parallel processes.

A grid file names ``name``, ``out`` and a ``[grid]`` table of lists (``algos``, ``datasets``, ``alphas``,
``seeds``); ``[common]`` holds any ``RunConfig`` field for every cell, ``[hp.<algo>]`` an algorithm's
hyper-parameters and ``[dataset.<name>]`` per-dataset overrides (e.g. ``model = "2nn"`` for synthetic).
``[variant.<label>]`` defines a named row: ``algo = "<algorithm>"`` plus its hyper-parameters (e.g. FedCMD's
``body_mode = "relay"``); ``algos`` may then list the label beside plain algorithm names.
Every cell is validated before any runs. Each cell writes a normal run folder under
``<out>/cells/<algo>/<dataset>/a<alpha>/s<seed>/``; a cell whose folder holds ``summary.json`` is done and
is not rerun. A cell that raises is recorded as failed, its traceback in ``<cell folder>.failed.log``.
At the end ``table.md``/``table.csv`` (paper layout: rows = algorithms, columns = datasets, one table per
alpha, mean ± std over seeds of the paper metric) and ``curves-<dataset>.png`` are written.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud.config import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOP_KEYS = {"name", "out", "grid", "common", "hp", "dataset", "variant"}
GRID_KEYS = ("algos", "datasets", "alphas", "seeds")
RESERVED = {"algo", "dataset", "alpha", "seed", "hp", "out", "partition"}


class GridError(Exception):
    """Problems with a grid file, one line each; nothing has run."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass(frozen=True)
class Cell:
    algo: str
    dataset: str
    alpha: float
    seed: int
    values: dict[str, Any] = field(hash=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.algo}/{self.dataset}/a{self.alpha}/s{self.seed}"

    def folder(self, out: Path) -> Path:
        return out / "cells" / self.algo / self.dataset / f"a{self.alpha}" / f"s{self.seed}"


@dataclass
class Grid:
    name: str
    out: Path
    algos: list[str]
    datasets: list[str]
    alphas: list[float]
    seeds: list[int]
    cells: list[Cell]


@dataclass
class Outcome:
    cell: Cell
    status: str  # "done" | "skipped" | "failed"
    log: Path | None = None
    message: str = ""


def load_grid(path: Path) -> Grid:
    """Parse a grid file into cells (structure only; ``validate`` checks every cell)."""
    if not path.is_file():
        raise GridError([f"grid file {path} does not exist"])
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise GridError([f"grid file {path} is not valid TOML: {e}"]) from None
    errors = [f"unknown top-level key {k!r} (expected one of {sorted(TOP_KEYS)})" for k in data if k not in TOP_KEYS]
    grid = data.get("grid")
    if not isinstance(grid, dict):
        raise GridError([*errors, "missing [grid] table with lists algos, datasets, alphas, seeds"])
    errors += [f"[grid] unknown key {k!r}" for k in grid if k not in GRID_KEYS]
    for k in GRID_KEYS:
        if not isinstance(grid.get(k), list) or not grid[k]:
            errors.append(f"[grid] {k} must be a non-empty list")
    if "out" not in data:
        errors.append("missing `out` (the experiment folder)")
    common = data.get("common", {})
    hp = data.get("hp", {})
    overrides = data.get("dataset", {})
    variants = data.get("variant", {})
    for label, table in (("[common]", common), ("[hp]", hp), ("[dataset]", overrides), ("[variant]", variants)):
        if not isinstance(table, dict):
            errors.append(f"{label} must be a table")
    if errors:
        raise GridError(errors)
    errors += [f"[common] {k!r} is set per cell by the grid; remove it" for k in common if k in RESERVED]
    for ds, table in overrides.items():
        if not isinstance(table, dict):
            errors.append(f"[dataset.{ds}] must be a table")
        elif ds not in grid["datasets"]:
            errors.append(f"[dataset.{ds}] names a dataset that is not in [grid] datasets")
        else:
            per_cell = RESERVED - {"partition"}
            errors += [f"[dataset.{ds}] {k!r} is set per cell by the grid" for k in table if k in per_cell]
    for algo, table in hp.items():
        if not isinstance(table, dict):
            errors.append(f"[hp.{algo}] must be a table")
        elif algo not in grid["algos"]:
            errors.append(f"[hp.{algo}] names an algorithm that is not in [grid] algos")
    rows: dict[str, tuple[str, dict[str, Any]]] = {}  # row label -> (algorithm, its hyper-parameters)
    for label, table in variants.items():
        if not isinstance(table, dict) or not isinstance(table.get("algo"), str):
            errors.append(f'[variant.{label}] must be a table with algo = "<algorithm>"')
        elif label not in grid["algos"]:
            errors.append(f"[variant.{label}] is not listed in [grid] algos")
        elif label in hp:
            errors.append(f"[hp.{label}] and [variant.{label}] both set; put the variant's values in the variant")
        else:
            rows[label] = (table["algo"], {k: v for k, v in table.items() if k != "algo"})
    if errors:
        raise GridError(errors)
    cells = []
    for row in grid["algos"]:
        algo, row_hp = rows.get(row, (row, dict(hp.get(row, {}))))
        for ds in grid["datasets"]:
            for alpha in grid["alphas"]:
                for seed in grid["seeds"]:
                    values = {**common, **overrides.get(ds, {})}
                    values.update(algo=algo, dataset=ds, alpha=alpha, seed=seed, hp=dict(row_hp))
                    cells.append(Cell(str(row), str(ds), alpha, seed, values))
    return Grid(str(data.get("name", path.stem)), Path(data["out"]), [str(a) for a in grid["algos"]],
                [str(d) for d in grid["datasets"]], list(grid["alphas"]), list(grid["seeds"]), cells)


def validate(grid: Grid) -> list[str]:
    """One line per problem, naming the cell; empty when every cell can start."""
    from cloud.config import resolve
    from fedcmd_core.data import DATASET_NAMES
    from fedcmd_core.strategies import parse_params

    problems: list[str] = []
    for cell in grid.cells:
        try:
            cfg = resolve(dict(cell.values), {})
        except ConfigError as e:
            problems.append(f"cell {cell.key}: {e}")
            continue
        if cfg.dataset not in DATASET_NAMES:
            problems.append(f"cell {cell.key}: unknown dataset {cfg.dataset!r} (known: {', '.join(DATASET_NAMES)})")
        if cfg.root is not None and not cfg.root.exists():
            problems.append(f"cell {cell.key}: dataset root {cfg.root} does not exist")
        try:
            parse_params(cfg.algo, cfg.hp)
        except ValueError as e:
            errs = getattr(e, "errors", None)
            detail = str(e)
            if callable(errs):
                err = errs()[0]
                detail = f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            problems.append(f"cell {cell.key}: bad hyper-parameter for {cfg.algo}: {detail}")
    return problems


def is_done(cell: Cell, out: Path) -> bool:
    return (cell.folder(out) / "summary.json").is_file()


def failed_log(cell: Cell, out: Path) -> Path:
    folder = cell.folder(out)
    return folder.parent / f"{folder.name}.failed.log"


def run_cell(values: dict[str, Any], folder: str) -> str:
    """Run one cell in this (worker) process and write its run folder; returns the folder."""
    from cloud import run_output
    from cloud.config import resolve
    from cloud.sim.simulate import build_and_run

    buffer = io.StringIO()
    run_output.capture_log(buffer)
    cfg = resolve(dict(values), {})

    def on_round(record: Any) -> None:
        logging.getLogger("fedcmd.rounds").info(
            "round %d (%s): %s", record.round + 1, record.phase,
            " ".join(f"{k}={v:.4f}" for k, v in sorted(record.metrics.items())),
        )

    with run_output.staged(Path(folder), force=True) as tmp:
        result = build_and_run(cfg, on_round=on_round)
        run_output.write_run(result, tmp, buffer.getvalue())
    return folder


def _run_cell_safe(values: dict[str, Any], folder: str, log_path: str) -> tuple[bool, str]:
    try:
        run_cell(values, folder)
    except Exception as e:  # any crash of a cell is recorded, the grid goes on
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text("".join(traceback.format_exception(type(e), e, e.__traceback__)))
        return False, f"{type(e).__name__}: {e}"
    Path(log_path).unlink(missing_ok=True)
    return True, ""


def _die_with_parent(parent: int) -> None:
    """Worker initialiser: on Linux, ask the kernel to SIGTERM this worker when the grid process dies.

    Without it, a grid killed with SIGTERM or SIGKILL left its workers running their cells, racing a
    restarted grid for the same folders. A grid that died while this worker was still starting (before
    the request) is caught by the parent check after it.
    """
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def run_grid(grid: Grid, jobs: int, on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run every cell without ``summary.json`` with ``jobs`` processes in all: up to ``jobs`` spawned cell
    processes, each training its clients in ``jobs // cells`` processes (at least one)."""
    outcomes: list[Outcome] = []
    todo: list[Cell] = []
    for cell in grid.cells:
        if is_done(cell, grid.out):
            outcomes.append(Outcome(cell, "skipped"))
            if on_done:
                on_done(outcomes[-1])
        else:
            todo.append(cell)
    if todo:
        ctx = multiprocessing.get_context("spawn")
        workers = max(1, min(jobs, len(todo)))
        # One budget of processes: what the cells leave over trains each cell's clients in parallel
        # (`--jobs` of fedcmd simulate, cloud/sim/pool.py: the same numbers as one process).
        cell_jobs = max(1, jobs // workers)
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_die_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            futures = {
                pool.submit(_run_cell_safe, {"jobs": cell_jobs, **c.values}, str(c.folder(grid.out)),
                            str(failed_log(c, grid.out))): c
                for c in todo
            }
            for fut in as_completed(futures):
                cell = futures[fut]
                try:
                    ok, message = fut.result()
                except Exception as e:  # a worker that died (e.g. killed) also fails only its cell
                    log = failed_log(cell, grid.out)
                    log.parent.mkdir(parents=True, exist_ok=True)
                    log.write_text(f"worker process failed: {type(e).__name__}: {e}\n")
                    ok, message = False, str(e)
                outcome = Outcome(cell, "done") if ok else Outcome(cell, "failed", failed_log(cell, grid.out), message)
                outcomes.append(outcome)
                if on_done:
                    on_done(outcome)
    return outcomes


def _cell_metrics(grid: Grid) -> dict[tuple[str, str, float], tuple[list[float], Path | None]]:
    """(algo, dataset, alpha) -> (paper metrics of finished seeds, failed log of the first failed seed)."""
    table: dict[tuple[str, str, float], tuple[list[float], Path | None]] = {}
    for cell in grid.cells:
        values, failed = table.get((cell.algo, cell.dataset, cell.alpha), ([], None))
        summary = cell.folder(grid.out) / "summary.json"
        if summary.is_file():
            values.append(float(json.loads(summary.read_text())["paper_metric"]))
        elif failed is None:
            log = failed_log(cell, grid.out)
            failed = log if log.is_file() else cell.folder(grid.out)
        table[(cell.algo, cell.dataset, cell.alpha)] = (values, failed)
    return table


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))  # std over seeds (population, ddof=0)


def write_tables(grid: Grid) -> tuple[Path, Path]:
    """``table.md`` (bold best, underlined second per column) and ``table.csv``, one table per alpha."""
    data = _cell_metrics(grid)
    md = [f"# {grid.name}", "", "Paper metric (mean of the last 10 rounds of pooled test accuracy before local "
          "training, %), mean ± std over seeds " + ", ".join(str(s) for s in grid.seeds) + ".", ""]
    # table.csv holds numbers, one row per (alpha, algorithm, dataset): mean and std in their own columns
    rows: list[list[str]] = [["alpha", "algorithm", "dataset", "mean", "std", "seeds", "failed"]]
    for alpha in grid.alphas:
        markup: dict[tuple[str, str], str] = {}
        for ds in grid.datasets:
            means: list[tuple[float, str]] = []
            for algo in grid.algos:
                values, failed = data[(algo, ds, alpha)]
                if failed is not None or not values:
                    markup[(algo, ds)] = f"failed ({failed})"
                    rows.append([str(alpha), algo, ds, "", "", str(len(values)), str(failed)])
                    continue
                mean, std = _mean_std(values)
                rows.append([str(alpha), algo, ds, f"{mean:.6f}", f"{std:.6f}", str(len(values)), ""])
                markup[(algo, ds)] = f"{mean:.2f} ± {std:.2f}"
                if not math.isnan(mean):
                    means.append((mean, algo))
            ranked = sorted(means, key=lambda t: -t[0])
            if ranked:
                markup[(ranked[0][1], ds)] = f"**{markup[(ranked[0][1], ds)]}**"
            if len(ranked) > 1:
                markup[(ranked[1][1], ds)] = f"<u>{markup[(ranked[1][1], ds)]}</u>"
        md += [f"## α = {alpha}", "", "| Method | " + " | ".join(grid.datasets) + " |",
               "|---|" + "---|" * len(grid.datasets)]
        for algo in grid.algos:
            md.append(f"| {algo} | " + " | ".join(markup[(algo, ds)] for ds in grid.datasets) + " |")
        md.append("")
    grid.out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = grid.out / "table.md", grid.out / "table.csv"
    md_path.write_text("\n".join(md))
    with csv_path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return md_path, csv_path


def _curve(folder: Path) -> list[float] | None:
    path = folder / "metrics.csv"
    if not path.is_file():
        return None
    with path.open() as f:
        return [float(r["test_before_acc"]) if r["test_before_acc"] else math.nan for r in csv.DictReader(f)]


def write_curves(grid: Grid) -> list[Path]:
    """One PNG per dataset: a subplot per alpha, a line per algorithm (mean over finished seeds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cloud.results import line_style

    paths = []
    for ds in grid.datasets:
        fig = Figure(figsize=(5 * len(grid.alphas) + 2.5, 4), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(grid.alphas), squeeze=False)[0]
        for ax, alpha in zip(axes, grid.alphas):
            for i, algo in enumerate(grid.algos):
                curves = [c for seed in grid.seeds
                          if (c := _curve(Cell(algo, ds, alpha, seed, {}).folder(grid.out)))]
                if not curves:
                    continue
                n = min(len(c) for c in curves)
                mean = np.nanmean(np.array([c[:n] for c in curves]), axis=0)
                colour, style = line_style(i)  # 10 colours x 4 line styles: every method its own line
                ax.plot(np.arange(1, n + 1), mean, label=algo, color=colour, linestyle=style)
            ax.set_title(f"{ds}, α = {alpha}")
            ax.set_xlabel("round")
            ax.set_ylabel("test accuracy before local training (%)")
            ax.grid(alpha=0.3)
        if any(ax.has_data() for ax in axes):
            # one legend, outside the data (right of the last panel): never over the rounds the metric averages
            handles, labels = next(ax for ax in axes if ax.has_data()).get_legend_handles_labels()
            fig.legend(handles, labels, loc="outside right upper", fontsize="small", frameon=False)
        path = grid.out / f"curves-{ds}.png"
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths
