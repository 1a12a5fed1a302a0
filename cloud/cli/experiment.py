"""``fedcmd experiment GRID.toml``: mounted on the main app by ``cloud.cli.main._mount_subcommands``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cloud.cli.errors import err_console, fail, print_error
from cloud.experiment.bundled import bundled_grids, find_grid
from fedcmd_core.suggest import did_you_mean

console = Console(stderr=False)


def experiment(
    grid_name: str = typer.Argument(..., metavar="GRID", help="A grid TOML file, or the name of a shipped grid: "
                                    f"{', '.join(bundled_grids())} (cloud/experiment/grids/)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Parallel cell processes [default: core count]."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the cells and whether each is done, estimate the "
                                 "time from a short calibration run, then exit."),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate",
                                   help="With --dry-run: time 2 rounds per dataset to estimate the grid's time."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Run algorithms x datasets x alpha x seeds; resumable; writes table.md, table.csv, curves-<dataset>.png.

    A grid file names `name`, `out` and a [grid] table (algos, datasets, alphas, seeds); [common] holds any
    `fedcmd simulate` setting, [hp.<algo>] hyper-parameters, [dataset.<name>] per-dataset settings and
    [variant.<label>] named rows (docs: cloud/experiment/grid.py).
    """
    from cloud.experiment.grid import (
        GridError,
        Outcome,
        is_done,
        load_grid,
        run_grid,
        validate,
        write_curves,
        write_tables,
    )

    grid_file = find_grid(Path(grid_name))
    if grid_file is None:
        fail(f"no grid file {grid_name!r} and no shipped grid of that name{did_you_mean(grid_name, bundled_grids())} "
             f"(shipped: {', '.join(bundled_grids())})")
    try:
        grid = load_grid(grid_file)
    except GridError as e:
        for line in e.lines:
            print_error(line)
        raise typer.Exit(2) from None
    problems = validate(grid)
    if problems:
        for line in problems:
            print_error(line)
        err_console.print(f"{len(problems)} problem(s); no cell was run", highlight=False)
        raise typer.Exit(2)
    if jobs is not None and jobs < 1:
        fail("--jobs must be at least 1")
    workers = jobs or os.cpu_count() or 1
    if dry_run:
        todo = []
        for cell in grid.cells:
            done = is_done(cell, grid.out)
            todo += [] if done else [cell]
            state = "done" if done else "todo"
            console.print(f"{state}  {cell.key}  -> {cell.folder(grid.out)}", highlight=False, soft_wrap=True)
        console.print(f"{len(grid.cells)} cells, {len(todo)} to run", highlight=False)
        if calibrate and todo:
            from cloud.experiment.estimate import estimate_grid

            est = estimate_grid(todo, workers, err_console)
            console.print(est.describe(), highlight=False, soft_wrap=True)
        return
    progress = Progress(
        TextColumn("[bold cyan]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console, disable=quiet, transient=True,
    )
    with progress:
        task = progress.add_task(grid.name, total=len(grid.cells), status="")

        def on_done(outcome: Outcome) -> None:
            progress.update(task, advance=1, status=f"{outcome.status}: {outcome.cell.key}")
            if outcome.status == "failed":
                progress.console.print(f"[red]failed[/] {outcome.cell.key}: {outcome.message} (log: {outcome.log})",
                                       highlight=False, soft_wrap=True)

        outcomes = run_grid(grid, workers, on_done)
    md, csv_path = write_tables(grid)
    pngs = write_curves(grid)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
    console.print(f"{counts['done']} run, {counts['skipped']} already done, {counts['failed']} failed; "
                  f"wrote {md}, {csv_path}, {len(pngs)} curve PNG(s)", highlight=False, soft_wrap=True)
