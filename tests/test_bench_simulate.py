"""fedcmd bench simulate's memory sampling (cloud/bench/simulate.py): the whole process tree is counted,
private pages of every process once, pages shared by a fork split between the processes (PSS)."""

from __future__ import annotations

import sys
from pathlib import Path

from cloud.bench.simulate import measure

# Parent and forked child each touch 120 MB of their own, after forking with 80 MB shared (never written).
CHILD = """
import os, time
shared = bytearray(80 << 20)
pid = os.fork()
mine = bytearray(120 << 20)
for i in range(0, len(mine), 4096):
    mine[i] = 1
time.sleep(1.5)
if pid:
    os.waitpid(pid, 0)
    print("ok")
"""


def test_measure_sums_the_process_tree(tmp_path: Path) -> None:
    wall, pss, hwm, procs, out = measure([sys.executable, "-c", CHILD], cwd=tmp_path, every=0.05)
    assert out.strip() == "ok" and wall >= 1.5
    assert procs == 2
    # PSS: 2 x 120 private + 80 shared counted once (the interpreters add a few MB each)
    assert 320 <= pss <= 400, pss
    # peak RSS summed counts the shared 80 MB in both processes
    assert hwm >= 400, hwm
