"""tests/skip_report.py: the summary groups skipped tests by reason with counts, and FEDCMD_ALLOWED_SKIPS
turns a skip for any other reason into a failed run (what .ci/run relies on)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASE = """
import pytest

@pytest.mark.parametrize("i", [1, 2])
def test_a(i):
    pytest.skip("no widget here")

@pytest.mark.skipif(True, reason="needs a GPU")
def test_b():
    pass

def test_c():
    assert 1 + 1 == 2
"""


def _pytest(tmp_path: Path, allowed: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_case.py").write_text(CASE)
    env = {k: v for k, v in os.environ.items() if k != "FEDCMD_ALLOWED_SKIPS"}
    env["PYTHONPATH"] = str(HERE)
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # hypothesis, timeout, ...: not needed, seconds to load
    if allowed is not None:
        env["FEDCMD_ALLOWED_SKIPS"] = allowed
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "skip_report", "test_case.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_skips_are_counted_by_reason(tmp_path: Path) -> None:
    r = _pytest(tmp_path, None)
    assert r.returncode == 0, r.stdout
    lines = r.stdout.splitlines()
    section = lines.index(next(line for line in lines if "skipped tests by reason" in line))
    assert lines[section + 1 : section + 3] == ["    2 skipped: no widget here", "    1 skipped: needs a GPU"]
    assert "1 passed, 3 skipped" in r.stdout


def test_a_skip_outside_the_allowed_reasons_fails_the_run(tmp_path: Path) -> None:
    r = _pytest(tmp_path, "GPU|CUDA")
    assert r.returncode == 1, r.stdout
    assert "FAILED: 2 skips not allowed by FEDCMD_ALLOWED_SKIPS='GPU|CUDA'" in r.stdout
    assert _pytest(tmp_path, "GPU|widget").returncode == 0


def test_no_skip_says_so(tmp_path: Path) -> None:
    (tmp_path / "test_case.py").write_text("def test_c():\n    assert True\n")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "skip_report", "test_case.py"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(HERE), "FEDCMD_ALLOWED_SKIPS": "GPU"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "none skipped" in r.stdout, r.stdout
