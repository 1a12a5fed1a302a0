"""Grids ship with the package: `fedcmd experiment offline` finds the bundled grid from any folder (a path
still works, a mistyped name gets a suggestion), and `--dry-run` estimates the grid's time from a short
calibration run (one per dataset), leaving out, and naming, datasets whose calibration fails."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloud.cli.main import app
from cloud.experiment.bundled import GRIDS, bundled_grids, find_grid
from cloud.experiment.estimate import Calibration, estimate_grid
from cloud.experiment.grid import load_grid

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def test_the_bundled_grids_are_the_repositorys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"offline", "paper_alpha"} <= set(bundled_grids())
    for link in (REPO / "experiments").glob("*.toml"):  # experiments/ keeps working: links to the shipped files
        assert link.resolve() == (GRIDS / link.name).resolve(), link
    monkeypatch.chdir(tmp_path)  # far from the checkout
    assert find_grid(Path("offline")) == GRIDS / "offline.toml" == find_grid(Path("offline.toml"))
    assert find_grid(Path("nowhere/offline")) is None
    result = runner.invoke(app, ["experiment", "offline", "--dry-run", "--no-calibrate"])
    assert result.exit_code == 0, result.output
    assert "432 cells, 432 to run" in result.output
    typo = runner.invoke(app, ["experiment", "ofline", "--dry-run"])
    assert typo.exit_code == 2 and "did you mean 'offline'?" in typo.output and "paper_alpha" in typo.output
    own = tmp_path / "mine.toml"
    own.write_text((GRIDS / "fedrep_check.toml").read_text())
    assert runner.invoke(app, ["experiment", str(own), "--dry-run", "--no-calibrate"]).exit_code == 0


def _grid(tmp_path: Path, datasets: str) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(f'name = "tiny"\nout = "{tmp_path / "out"}"\n[grid]\nalgos = ["local", "fedavg"]\n'
                    f"datasets = [{datasets}]\nalphas = [0.5]\nseeds = [1, 2]\n[common]\nclient_num = 4\n"
                    "join_ratio = 0.5\nglobal_epoch = 3\nlocal_epoch = 1\nleast_samples = 5\ntest_gap = 0\n")
    return path


def test_dry_run_estimates_from_a_calibration_run(tmp_path: Path) -> None:
    # synthetic with the default lenet5 fails inside the cell: its calibration fails the same way
    result = runner.invoke(app, ["experiment", str(_grid(tmp_path, '"digits", "synthetic"')), "--dry-run",
                                 "--jobs", "1"])
    assert result.exit_code == 0, result.output
    m = re.search(r"estimate: (.+?) for 4 cells with 1 parallel job\(s\).*digits: ([\d.]+) s/round \(local\), "
                  r"setup ([\d.]+) s", result.output)
    assert m, result.output
    assert "Not estimated: 4 cell(s)" in result.output and "synthetic:" in result.output
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    # the arithmetic: every cell is setup + rounds x the calibrated round time, scaled by its work per round
    grid = load_grid(_grid(tmp_path, '"digits"'))
    import cloud.experiment.estimate as est

    fake = Calibration("digits", "local", setup_s=2.0, round_s=0.5, work=2.0)
    original = est.calibrate
    est.calibrate = lambda values: fake  # type: ignore[assignment]
    try:
        e = estimate_grid(grid.cells, jobs=8)
    finally:
        est.calibrate = original
    assert e.cells == 4 and e.total_s == pytest.approx(4 * (2.0 + 3 * 0.5))
    assert e.workers == min(8, len(grid.cells), __import__("os").cpu_count())
    assert e.wall_s == pytest.approx(e.total_s / e.workers)
