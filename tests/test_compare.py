"""`fedcmd compare`: finds run folders recursively, shows the variant and every differing hyper-parameter as
columns, never cuts a name, prints numbers as CSV / JSON, overlays curves; bad input is one line."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloud import run_output
from cloud.cli.main import app
from cloud.results import LINESTYLES, PALETTE, line_style
from cloud.service.coordinator import RoundRecord

LONG = "a-very-long-experiment-name-that-does-not-fit-in-eighty-columns-at-all"


def _run(folder: Path, body_mode: str, tau: float, accs: list[float]) -> Path:
    """A run folder written by the real writer from hand-made round records."""
    records = [RoundRecord(i, "personal", [0, 1], {"test_before_acc": a, "test_after_acc": a + 1}, 1000, 2000, 0.5,
                           {}, [0, 1]) for i, a in enumerate(accs)]
    result = run_output.RunRecorder(records=records, final={"test_before_acc": accs[-1]},
                                    strategy_summary={"chosen_layer": "fc2", "body_mode": body_mode,
                                                      "variant": "default"}, seconds=7.0)
    config = {"algo": "fedcmd", "dataset": "digits", "seed": 1, "global_epoch": len(accs), "out": str(folder),
              "hp": {"body_mode": body_mode, "tau": tau, "selection_rounds": 2}}
    info = run_output.RunInfo("fedcmd", "digits", "lenet5", 1, 2, "sim", config, {"command": ["fedcmd"]},
                              save_fig=False, save_log=False)
    folder.mkdir(parents=True)
    run_output.write_run(result, folder, "", info)
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path, Path]:
    top = tmp_path / LONG
    a = _run(top / "weighted" / "s1", "weighted", 0.5, [50.0, 60.0, 70.0])
    b = _run(top / "relay" / "s1", "relay", 0.5, [55.0, 65.0, 80.0])
    c = _run(top / "relay" / "tau" / "s1", "relay", 2.0, [40.0, 42.0, 44.0])
    (top / ".partial-run").mkdir()  # a run still being written is not a run
    (top / ".partial-run" / "summary.json").write_text("{half")
    return a, b, c


def test_recursive_search_differing_hyper_parameters_as_columns_and_csv_numbers(runs: tuple[Path, ...]) -> None:
    top = runs[0].parents[1]
    result = CliRunner().invoke(app, ["compare", str(top), "--csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert sorted(r["run"] for r in rows) == sorted(str(r) for r in runs)
    header = list(rows[0])
    # what differs is a column (body mode and tau); what is the same (selection_rounds, seed) is not
    assert "hp.body_mode" in header and "hp.tau" in header
    assert "hp.selection_rounds" not in header and "seed" not in header and "out" not in header
    by_run = {r["run"]: r for r in rows}
    assert by_run[str(runs[0])]["hp.body_mode"] == "weighted" and by_run[str(runs[1])]["hp.body_mode"] == "relay"
    assert by_run[str(runs[0])]["variant"] == "default/weighted" and by_run[str(runs[1])]["variant"] == "default/relay"
    assert float(by_run[str(runs[1])]["paper_metric"]) == pytest.approx((55 + 65 + 80) / 3)
    assert float(by_run[str(runs[2])]["hp.tau"]) == 2.0
    js = json.loads(CliRunner().invoke(app, ["compare", str(top), "--json"]).output)
    assert js["columns"] == header
    assert {r["run"]: r["paper_metric"] for r in js["runs"]}[str(runs[0])] == pytest.approx(60.0)


def test_names_are_never_cut_on_a_narrow_terminal(runs: tuple[Path, ...]) -> None:
    exe = Path(sys.executable).with_name("fedcmd")
    top = runs[0].parents[1]
    out = subprocess.run([str(exe), "compare", str(top)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "80"}).stdout
    assert "…" not in out
    for run in runs:
        assert f"  {run}\n" in out  # every full path on its own legend line
    assert "weighted" in out and "relay" in out and "hp.body_mode" in out


def test_plot_overlays_every_run_with_distinct_lines(runs: tuple[Path, ...], tmp_path: Path) -> None:
    png = tmp_path / "curves.png"
    result = CliRunner().invoke(app, ["compare", *map(str, runs), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    styles = {line_style(i) for i in range(len(PALETTE) * len(LINESTYLES))}
    assert len(styles) == 40  # 16 methods (the grid's) and more get their own colour/style pair


def test_bad_input_is_one_line(tmp_path: Path, runs: tuple[Path, ...]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["compare", str(empty)])
    assert result.exit_code == 2 and "no run folders found" in result.output and "Traceback" not in result.output
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "summary.json").write_text("[1, 2")
    result = CliRunner().invoke(app, ["compare", str(broken)])
    assert result.exit_code == 2 and "not valid JSON" in result.output
    result = CliRunner().invoke(app, ["compare", str(runs[0]), "--csv", "--json"])
    assert result.exit_code == 2 and "not both" in result.output
