"""``fedcmd simulate --jobs N`` (cloud/sim/pool.py): clients trained in forked worker processes give the
same run as one process, bit for bit, for every registered algorithm (and FedCMD's relay); a worker killed
mid-run fails the run at once with one line."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from typing import Any

import numpy as np
import pytest

from cloud.config import resolve
from cloud.sim.pool import WorkerDied, free_cores, resolve_jobs, run_parallel
from cloud.sim.setup import SimulationResult, prepare
from cloud.sim.simulate import build_and_run
from fedcmd_core.strategies import algorithms

# Phases switch inside the 4 rounds: FedCMD votes for 2 rounds, pFedSim/FedAP warm up for 2, and every
# second round evaluates all clients.
PHASE_HP: dict[str, dict[str, Any]] = {
    "fedcmd": {"selection_rounds": 2},
    "fedcmd_noweight": {"selection_rounds": 2},
    "pfedsim": {"warmup_round": 2},
    "fedap": {"warmup_round": 2},
    "fedfomo": {"M": 2},
}
CASES = [(a, PHASE_HP.get(a, {})) for a in algorithms()] + [("fedcmd", {"selection_rounds": 2, "body_mode": "relay"})]


def _cfg(algo: str, hp: dict[str, Any], jobs: int, **extra: Any) -> Any:
    values = {"algo": algo, "dataset": "digits", "client_num": 6, "alpha": 0.5, "join_ratio": 0.5, "seed": 5,
              "global_epoch": 4, "local_epoch": 1, "test_gap": 2, "save_model": True, "jobs": jobs, "hp": hp}
    return resolve({}, {**values, **extra})


def _facts(r: SimulationResult) -> dict[str, Any]:
    """Everything a run computed; only wall-clock values are left out."""
    records = [
        (x.round, x.phase, x.clients, x.answered, x.bytes_down, x.bytes_up,
         {k: v for k, v in x.metrics.items() if "seconds" not in k},
         {k: v for k, v in x.facts.items() if "seconds" not in k})
        for x in r.records
    ]
    return {"records": records, "final": r.final, "summary": r.strategy_summary, "rejected": r.rejected,
            "clipped": r.clipped}


def _same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize(("algo", "hp"), CASES, ids=[f"{a}-{h.get('body_mode', 'default')}" for a, h in CASES])
def test_two_jobs_equal_one_bit_for_bit(algo: str, hp: dict[str, Any]) -> None:
    one = build_and_run(_cfg(algo, hp, jobs=1))
    stats: dict[str, Any] = {}
    p = prepare(_cfg(algo, hp, jobs=2))
    two = run_parallel(p, 2, stats_out=stats)
    assert _facts(two) == _facts(one)
    _same_arrays(two.global_arrays, one.global_arrays)
    assert len(one.records) == 4 and one.final
    # the work really ran in both workers, and client states really moved between them
    assert len(stats["tasks_per_worker"]) == 2 and min(stats["tasks_per_worker"]) > 0
    assert stats["moved_states"] > 0
    assert sum(stats["tasks_per_worker"]) >= sum(len(x.clients) for x in one.records) + 6  # + evaluations


def test_jobs_through_build_and_run_and_attackers() -> None:
    """--jobs reaches the pool from the configuration; a poisoned run is identical too (the attack's
    noise stream and counter travel with the client)."""
    extra = {"attackers": 2, "attack": "noise", "attack_scale": 3.0}
    one = build_and_run(_cfg("fedavg", {}, jobs=1, **extra))
    three = build_and_run(_cfg("fedavg", {}, jobs=3, **extra))
    assert _facts(three) == _facts(one)
    assert one.attackers == three.attackers and len(one.attackers) == 2


def test_killed_worker_fails_the_run_at_once() -> None:
    """SIGKILL a worker after round 1: the run raises WorkerDied naming it within seconds, never hangs."""
    p = prepare(_cfg("fedavg", {}, jobs=2, global_epoch=50))
    killed: list[int] = []

    def on_round(record: Any) -> None:
        if record.round == 0:
            workers = [c for c in mp.active_children() if c.name.startswith("fedcmd-client-worker-")]
            assert len(workers) == 2
            killed.append(workers[0].pid or 0)
            os.kill(workers[0].pid or 0, signal.SIGKILL)

    start = time.monotonic()
    with pytest.raises(WorkerDied, match=r"client worker \d \(pid \d+\) died \(killed by signal 9\)"):
        run_parallel(p, 2, on_round=on_round)
    assert killed and time.monotonic() - start < 30
    assert not [c for c in mp.active_children() if c.name.startswith("fedcmd-client-worker-")]  # none left


def test_resolve_jobs() -> None:
    assert resolve_jobs(3, 10) == 3
    assert resolve_jobs(8, 2) == 2  # never more workers than clients
    assert resolve_jobs(0, 100) == free_cores()
    assert 1 <= free_cores() <= (os.cpu_count() or 1)


def test_grid_gives_its_spare_processes_to_the_cell(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A one-cell grid with --jobs 2 trains that cell's clients in 2 processes: its summary and metrics
    equal the same cell's at one job (wall-clock values aside)."""
    import csv
    import json

    from cloud.experiment.grid import load_grid, run_cell, run_grid

    def grid(name: str, jobs_line: str) -> Any:
        path = tmp_path / f"{name}.toml"
        path.write_text(f'name = "{name}"\nout = "{tmp_path / name}"\n[grid]\nalgos = ["fedavg"]\n'
                        'datasets = ["digits"]\nalphas = [0.5]\nseeds = [1]\n[common]\nglobal_epoch = 3\n'
                        f"client_num = 6\nlocal_epoch = 1\njoin_ratio = 0.5\n{jobs_line}")
        return load_grid(path)

    shared = grid("shared", "")
    assert [o.status for o in run_grid(shared, 2)] == ["done"]
    a, b = shared.cells[0].folder(shared.out), tmp_path / "single"
    run_cell({**shared.cells[0].values, "jobs": 1}, str(b))  # the same cell in this process, one job
    assert json.loads((a / "config.json").read_text())["jobs"] == 2  # the spare process went to the cell
    assert json.loads((b / "config.json").read_text())["jobs"] == 1

    def numbers(folder: Any) -> Any:
        summary = {k: v for k, v in json.loads((folder / "summary.json").read_text()).items() if "seconds" not in k}
        with open(folder / "metrics.csv") as f:
            rows = [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(f)]
        return summary, rows

    sa, ra = numbers(a)
    sb, rb = numbers(b)
    assert ra == rb and len(ra) == 3
    assert {k: v for k, v in sa.items() if k not in ("config", "provenance")} == \
        {k: v for k, v in sb.items() if k not in ("config", "provenance")}
