"""An interrupted `fedcmd simulate` leaves no run folder or a complete one, never a half-written one
(README: results go to a hidden folder renamed into place at the end). Real processes, real signals:
Ctrl-C and SIGTERM (handled: nothing is left, exit 130 / 143) and SIGKILL after round 2 of 200, and
SIGKILL the moment the first file of the run folder is being written (seen with inotify). A later run to
the same --out first clears what a killed one left behind."""

from __future__ import annotations

import csv
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fswatch import IN_CREATE, IN_DELETE, FolderWatch

FEDCMD = Path(sys.executable).parent / "fedcmd"
RUN_FILES = ["accuracy.png", "config.json", "metrics.csv", "run.log", "summary.json"]
ROUND_ROW = re.compile(r"^\s*(\d+) │ +train │")


def _start(partition: Path, out: Path, rounds: int) -> subprocess.Popen[str]:
    argv = [
        str(FEDCMD),
        "simulate",
        "--algo",
        "fedavg",
        "-d",
        "mnist5k",
        "--partition",
        str(partition),
        "-jr",
        "0.1",
        "-ge",
        str(rounds),
        "-vg",
        "1",
        "--seed",
        "2",
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    # Ctrl-C must reach the run even where this test runs in the background (a shell gives background jobs
    # SIGINT ignored, the child inherits that, and Python then never raises KeyboardInterrupt)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_round(proc: subprocess.Popen[str], rnd: int, timeout: float) -> list[str]:
    """Read the run's round tables until round ``rnd`` was printed; returns what was read."""
    assert proc.stdout is not None
    seen: list[str] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if not ready:
            continue
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        m = ROUND_ROW.match(line)
        if m and int(m.group(1)) >= rnd:
            return seen
    raise AssertionError(f"round {rnd} was never reported: {''.join(seen)[-2000:]}")


def _is_complete(out: Path, rounds: int) -> None:
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == list(range(1, rounds + 1))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == rounds and summary["algo"] == "fedavg"
    assert json.loads((out / "config.json").read_text())["global_epoch"] == rounds


@pytest.mark.timeout(300)
def test_a_killed_simulate_leaves_no_run_folder_or_a_complete_one(tmp_path: Path, shared_partition: Path) -> None:
    out = tmp_path / "run"
    partial = tmp_path / ".run.partial"
    handled = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated (SIGTERM)")}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):  # mid-training: round 2 of 200 reported
        proc = _start(shared_partition, out, 200)
        try:
            _wait_for_round(proc, 2, 180)
            proc.send_signal(sig)
            # Ctrl-C and SIGTERM are handled: the staging folder is removed on the way out, exit 128 + signal
            assert proc.wait(30) == (handled[sig][0] if sig in handled else -sig)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert not out.exists(), sig  # no run folder: nothing was renamed into place
        if sig in handled:
            assert list(tmp_path.iterdir()) == []  # nothing at all, hidden or empty
            assert handled[sig][1] in (proc.stdout.read() if proc.stdout else "")
            continue
        # SIGKILL cannot be handled: only the hidden staging folder is left, without any result in it yet
        assert [p.name for p in tmp_path.iterdir()] == [partial.name]
        assert sorted(p.name for p in partial.iterdir()) == []

    # SIGKILL while the run folder is written: the staging folder is where the files go, so out is absent
    # (or, had the kill landed after the rename, complete)
    parent = FolderWatch(tmp_path)
    proc = _start(shared_partition, out, 3)
    try:
        parent.wait_for(IN_DELETE, partial.name, 120)  # the last run's leftover is cleared first...
        parent.wait_for(IN_CREATE, partial.name, 60)  # ... then staged afresh
        inside = FolderWatch(partial)
        first = inside.wait_for(IN_CREATE, "", 180)
        proc.kill()
        assert proc.wait(30) == -signal.SIGKILL
        inside.close()
    finally:
        parent.close()
        if proc.poll() is None:
            proc.kill()
    assert first.name in RUN_FILES
    if out.exists():  # the kill came after the rename
        _is_complete(out, 3)
