"""`fedcmd experiment`: a tiny grid end to end (tables, curves, resume, a crashed cell) and rejected grids."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloud.cli.main import app

runner = CliRunner()
COMMON = "[common]\nglobal_epoch = 2\nclient_num = 5\nlocal_epoch = 1\nleast_samples = 5\njoin_ratio = 0.4\n"


def _grid(
    tmp_path: Path, algos: str = '"fedavg", "local"', datasets: str = '"digits"', alphas: str = "0.5", extra: str = ""
) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(
        f'name = "tiny"\nout = "{tmp_path / "out"}"\n[grid]\nalgos = [{algos}]\ndatasets = [{datasets}]\n'
        f"alphas = [{alphas}]\nseeds = [1, 2]\n{COMMON}{extra}"
    )
    return path


def test_tiny_grid_runs_tables_curves_resume_and_a_crashed_cell(tmp_path: Path) -> None:
    # synthetic keeps the default lenet5 model: a genuine failure inside the cell (vector inputs), which the
    # pre-run validation does not catch because it needs the loaded dataset; the digits cells still finish.
    grid = _grid(tmp_path, datasets='"digits", "synthetic"')
    res = runner.invoke(app, ["experiment", str(grid), "--jobs", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    md = (out / "table.md").read_text()
    assert "## α = 0.5" in md and "| Method | digits | synthetic |" in md
    rows = {
        line.split("|")[1].strip(): line
        for line in md.splitlines()
        if line.startswith("| fedavg") or line.startswith("| local")
    }
    assert set(rows) == {"fedavg", "local"}
    assert " ± " in rows["fedavg"] and md.count("**") == 2 and md.count("<u>") == 1
    failed_log = out / "cells" / "fedavg" / "synthetic" / "a0.5" / "s1.failed.log"
    assert f"failed ({failed_log})" in rows["fedavg"]
    assert "needs image inputs" in failed_log.read_text()
    with (out / "table.csv").open() as f:
        long = list(csv.DictReader(f))
    # table.csv holds numbers: one row per (alpha, algorithm, dataset), mean and std in their own columns
    assert all(r["failed"] == "" and r["seeds"] == "2" for r in long if r["dataset"] == "digits")
    assert all(r["failed"] and r["mean"] == "" for r in long if r["dataset"] == "synthetic")
    md_cells = {r["algorithm"]: r for r in long if r["dataset"] == "digits"}
    table = [[r["alpha"], algo, f"{float(r['mean']):.2f} ± {float(r['std']):.2f}"] for algo, r in md_cells.items()]
    # every finished cell is the mean ± population std of its seeds' paper metrics, recomputed here
    for row in table:
        seeds = [
            json.loads((out / "cells" / row[1] / "digits" / "a0.5" / f"s{s}" / "summary.json").read_text())
            for s in (1, 2)
        ]
        metrics = [float(m["paper_metric"]) for m in seeds]
        assert all(0 < m <= 100 for m in metrics) and all(m["rounds"] == 2 for m in seeds)
        assert float(md_cells[row[1]]["mean"]) == pytest.approx(statistics.fmean(metrics), abs=1e-6)
        assert float(md_cells[row[1]]["std"]) == pytest.approx(statistics.pstdev(metrics), abs=1e-6)
        assert row[2] == f"{statistics.fmean(metrics):.2f} ± {statistics.pstdev(metrics):.2f}", (row, metrics)
    best = max(table, key=lambda r: float(r[2].split(" ± ")[0]))
    assert rows[best[1]].count(f"**{best[2]}**") == 1
    png = out / "curves-digits.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    summaries = sorted((out / "cells").glob("*/digits/a0.5/s*/summary.json"))
    assert len(summaries) == 4
    mtimes = [p.stat().st_mtime_ns for p in summaries]

    res = runner.invoke(app, ["experiment", str(grid), "--jobs", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "4 already done" in res.output
    assert [p.stat().st_mtime_ns for p in summaries] == mtimes

    res = runner.invoke(app, ["experiment", str(grid), "--dry-run"])
    assert res.exit_code == 0 and "done  fedavg/digits/a0.5/s1" in res.output and "8 cells" in res.output


@pytest.mark.parametrize(
    ("kwargs", "expected", "count"),
    [
        ({"algos": '"fedavg", "fedfoo"'}, "cell fedfoo/digits/a0.5/s1: algo: unknown algorithm", 2),
        ({"datasets": '"digits", "nosuchdata"'}, "cell fedavg/nosuchdata/a0.5/s1: unknown dataset 'nosuchdata'", 4),
        ({"alphas": "0.5, -1.0"}, "cell fedavg/digits/a-1.0/s1: alpha:", 4),
        ({"extra": "[hp.fedavg]\nnot_a_knob = 3\n"}, "cell fedavg/digits/a0.5/s1: bad hyper-parameter for fedavg", 2),
        ({"extra": '[dataset.digits]\nroot = "/no/such/root"\n'}, "cell fedavg/digits/a0.5/s1: dataset root", 4),
        ({"extra": '[variant.odd]\nalgo = "fedcmd"\n'}, "[variant.odd] is not listed in [grid] algos", 1),
        (
            {"algos": '"fedavg", "relay"', "extra": '[variant.relay]\nalgo = "fedcmd"\nbody_mode = "sideways"\n'},
            "cell relay/digits/a0.5/s1: bad hyper-parameter for fedcmd: body_mode",
            2,
        ),
    ],
)
def test_bad_grid_is_rejected_before_any_cell_runs(
    tmp_path: Path, kwargs: dict[str, str], expected: str, count: int
) -> None:
    res = runner.invoke(app, ["experiment", str(_grid(tmp_path, **kwargs))])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert any(expected in line for line in lines), res.output
    assert len(lines) == count  # one line per bad cell, each naming its cell
    assert not (tmp_path / "out").exists()


def test_variant_rows_carry_their_algorithm_and_hyper_parameters(tmp_path: Path) -> None:
    from cloud.experiment.grid import load_grid, validate

    extra = '[hp.fedcmd]\ntau = 0.5\n[variant.fedcmd-relay]\nalgo = "fedcmd"\nbody_mode = "relay"\n'
    grid = load_grid(_grid(tmp_path, algos='"fedcmd", "fedcmd-relay"', extra=extra))
    assert validate(grid) == []
    rows = {c.algo: (c.values["algo"], c.values["hp"]) for c in grid.cells}
    assert rows == {"fedcmd": ("fedcmd", {"tau": 0.5}), "fedcmd-relay": ("fedcmd", {"body_mode": "relay"})}
    assert grid.cells[-1].folder(tmp_path).parts[-4] == "fedcmd-relay"


def test_shipped_grids_validate(tmp_path: Path) -> None:
    from cloud.experiment.grid import load_grid, validate

    repo = Path(__file__).resolve().parents[1]
    offline = load_grid(repo / "experiments" / "offline.toml")
    assert len(offline.cells) == 16 * 3 * 3 * 3 and validate(offline) == []
    paper = tmp_path / "paper.toml"
    text = (repo / "experiments" / "paper_alpha.toml").read_text()
    paper.write_text(text.replace("/path/to/datasets", str(tmp_path)))
    grid = load_grid(paper)
    assert validate(grid) == [] and {c.values["client_num"] for c in grid.cells} == {100}
    unset = validate(load_grid(repo / "experiments" / "paper_alpha.toml"))
    assert unset and all("dataset root /path/to/datasets does not exist" in line for line in unset)


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        out.update(int(c) for c in children)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_workers_die_with_a_killed_grid(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    grid = _grid(tmp_path, extra="").read_text().replace("global_epoch = 2", "global_epoch = 500")
    (tmp_path / "grid.toml").write_text(grid)
    fedcmd = Path(sys.executable).parent / "fedcmd"
    proc = subprocess.Popen(
        [str(fedcmd), "experiment", str(tmp_path / "grid.toml"), "--jobs", "2", "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        end = time.monotonic() + 60
        workers: set[int] = set()
        while time.monotonic() < end and len(workers) < 2:
            workers = {c for c in _children(proc.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()}
            time.sleep(0.2)
        assert len(workers) == 2, "the grid never started its two workers"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        end = time.monotonic() + 15
        while time.monotonic() < end and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "workers outlived the killed grid"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_table_cells_are_mean_and_population_std_of_the_seeds_by_hand(tmp_path: Path) -> None:
    """write_tables on summaries written here: each cell is mean ± std over seeds (ddof 0), the best of a
    column bold, the second underlined, a cell with a failed seed says so and is not ranked."""
    from cloud.experiment.grid import failed_log, load_grid, write_tables

    grid = load_grid(_grid(tmp_path, algos='"fedavg", "local", "fedper"', datasets='"digits", "synthetic"'))
    metrics = {  # (algo, dataset) -> paper metric of seed 1, seed 2 (None: the seed failed)
        ("fedavg", "digits"): (90.0, 94.0),  # 92.00 ± 2.00 (the sample std would be 2.83)
        ("local", "digits"): (80.0, 81.0),  # 80.50 ± 0.50
        ("fedper", "digits"): (95.5, 96.5),  # 96.00 ± 0.50: best
        ("fedavg", "synthetic"): (70.0, 71.0),  # 70.50 ± 0.50: best (fedper failed)
        ("local", "synthetic"): (60.0, 62.0),  # 61.00 ± 1.00: second
        ("fedper", "synthetic"): (65.0, None),
    }
    for cell in grid.cells:
        value = metrics[cell.algo, cell.dataset][cell.seed - 1]
        if value is None:
            failed_log(cell, grid.out).parent.mkdir(parents=True, exist_ok=True)
            failed_log(cell, grid.out).write_text("boom\n")
            continue
        cell.folder(grid.out).mkdir(parents=True)
        (cell.folder(grid.out) / "summary.json").write_text(json.dumps({"paper_metric": value}))
    md_path, csv_path = write_tables(grid)
    with csv_path.open() as f:
        table = list(csv.reader(f))
    failed = failed_log(
        next(c for c in grid.cells if c.algo == "fedper" and c.dataset == "synthetic" and c.seed == 2), grid.out
    )
    assert table == [  # numbers: mean and population std in their own columns, one row per cell
        ["alpha", "algorithm", "dataset", "mean", "std", "seeds", "failed"],
        ["0.5", "fedavg", "digits", "92.000000", "2.000000", "2", ""],
        ["0.5", "local", "digits", "80.500000", "0.500000", "2", ""],
        ["0.5", "fedper", "digits", "96.000000", "0.500000", "2", ""],
        ["0.5", "fedavg", "synthetic", "70.500000", "0.500000", "2", ""],
        ["0.5", "local", "synthetic", "61.000000", "1.000000", "2", ""],
        ["0.5", "fedper", "synthetic", "", "", "1", str(failed)],
    ]
    md = md_path.read_text().splitlines()
    assert "| fedavg | <u>92.00 ± 2.00</u> | **70.50 ± 0.50** |" in md
    assert "| local | 80.50 ± 0.50 | <u>61.00 ± 1.00</u> |" in md
    assert f"| fedper | **96.00 ± 0.50** | failed ({failed}) |" in md
