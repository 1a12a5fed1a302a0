"""``fedcmd compare``: finished runs side by side."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from cloud.cli.errors import fail, print_error

console = Console()


def compare(
    runs: list[Path] = typer.Argument(..., help="Run folders, or folders holding them (searched recursively)."),
    csv_out: bool = typer.Option(False, "--csv", help="Print CSV (one row per run, numbers unformatted)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON: {columns, runs}."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write the runs' accuracy curves overlaid (PNG)."),
) -> None:
    """Compare finished runs: paper metric, final personalized accuracy, chosen layer, bytes, time.

    Columns show the algorithm, its variant (FedCMD's variant/body mode) and every setting or
    hyper-parameter that differs between the runs. Names are never cut: long run paths wrap."""
    from cloud.results import ResultsError, find_runs, rows, to_csv, to_json
    from cloud.results import plot as plot_runs

    if csv_out and json_out:
        fail("give --csv or --json, not both")
    try:
        found, skipped = find_runs(runs)
        columns, table = rows(found)
        if plot is not None:
            labels = [_label(r, columns) for r in table]
            plot_runs(found, labels, plot)
    except ResultsError as e:
        fail(str(e))
        return
    for reason in skipped:
        print_error(f"skipped {reason}")
    if csv_out:
        sys.stdout.write(to_csv(columns, table))
        return
    if json_out:
        sys.stdout.write(to_json(columns, table))
        return
    t = Table(title=f"{len(table)} run{'s' if len(table) != 1 else ''} side by side")
    numeric = {"paper_metric", "final_personalized_acc", "rounds", "mib_down", "mib_up", "seconds"}
    heads = {"paper_metric": "paper metric %", "final_personalized_acc": "final all-client %", "chosen_layer": "layer",
             "mib_down": "MiB down", "mib_up": "MiB up", "seconds": "s", "run": "#"}
    for col in columns:
        t.add_column(heads.get(col, col), justify="right" if col in numeric or col == "run" else "left", no_wrap=True)
    for i, row in enumerate(table, 1):
        t.add_row(str(i), *(_cell(row.get(c), c) for c in columns[1:]))
    # Never cut: the table is as wide as its widest cell (a narrow terminal wraps the lines, it loses nothing),
    # and run folders are numbered, their full paths listed below.
    needed = Console(width=100_000).measure(t).maximum
    out = Console(width=max(console.width, needed), soft_wrap=True)
    out.print(t)
    for i, row in enumerate(table, 1):
        out.print(f"#{i}  {row['run']}", soft_wrap=True, highlight=False, markup=False)
    if plot is not None:
        console.print(f"curves: {plot}")


def _cell(v: object, col: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}" if col == "seconds" else f"{v:.2f}"
    return str(v)


def _label(row: dict, columns: list[str]) -> str:
    """A legend entry: algo, variant and the differing settings, e.g. ``fedcmd relay hp.tau=0.5``."""
    fixed = {"run", "algo", "variant", "dataset", "paper_metric", "final_personalized_acc", "chosen_layer", "rounds",
             "mib_down", "mib_up", "seconds"}
    parts = [str(row.get("algo"))]
    if row.get("variant") not in (None, "-"):
        parts.append(str(row["variant"]))
    parts += [f"{c}={row.get(c)}" for c in columns if c not in fixed]
    return " ".join(parts)
