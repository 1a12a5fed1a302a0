"""`fedcmd bench ...`: the sub-app and its thin commands; the engines are in `cloud/bench/`."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cloud.cli.apps import new_app

bench_app = new_app("Benchmarks: native kernels vs their baselines, an MQTT fleet, hostile clients, partitioning.")
_out = Console(highlight=False)
_err = Console(stderr=True, highlight=False)


@bench_app.command("kernels")
def kernels_cmd(
    quick: bool = typer.Option(False, "--quick", help="Small sizes: a smoke run of a few seconds (tests use it)."),
    repeat: int = typer.Option(5, "--repeat", "-r", min=1, help="Best of this many runs per measurement."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (progress still goes to stderr)."),
) -> None:
    """Native kernels vs the NumPy fallback vs the named baselines, with ratios and GB/s."""
    from cloud.bench.kernels import render, run_kernel_bench

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_err,
        transient=True,
    ) as progress:
        rep = run_kernel_bench(quick=quick, repeat=repeat, progress=progress)
    if as_json:
        print(json.dumps(rep.as_json(), indent=2))
    else:
        render(rep, _out)


