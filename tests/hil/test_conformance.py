"""Conformance of the devices of a fleet: registration, training, broker restart, ONNX, link cut.

The broker restarts come last: a broker without persistence forgets every retained message, so if a
device does not recover from them, no other test fails for that reason.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hil.coordinator import CoordinatorRun, answered, sampled, wait_file
from hil.fleet import FleetUnderTest

# make hil-arm (FEDCMD_HIL_ARM=1): the fleet has an emulated device, whose rounds take far longer
pytestmark = [pytest.mark.hil, pytest.mark.timeout(2400 if os.environ.get("FEDCMD_HIL_ARM") == "1" else 600)]

RUN_TIMEOUT = 300.0  # seconds a coordinator run may take, registration included


@dataclass
class Baseline:
    """One short run every device takes part in; several tests read it."""

    run: CoordinatorRun
    rows: list[dict[str, str]]
    presence: dict[int, dict[str, Any]]
    online: int


@pytest.fixture(scope="module")
def baseline(fleet: FleetUnderTest, tmp_path_factory: pytest.TempPathFactory) -> Baseline:
    fleet.require("coordinator")
    run = fleet.coordinator(tmp_path_factory.mktemp("baseline"), rounds=3)
    ids = {d.id for d in fleet.devices}
    w = fleet.watcher
    w.wait(lambda: ids <= {c for c, p in w.presence.items() if p.get("state") == "online"}
           and w.status.get("state") in ("running", "finished"),
           RUN_TIMEOUT * fleet.pace, "every device online and the run started", fleet.explain)
    online, presence = int(w.status.get("online", 0)), {c: dict(p) for c, p in w.presence.items()}
    rows = run.wait(RUN_TIMEOUT * fleet.pace)
    return Baseline(run, rows, presence, online)


def test_device_registers_with_its_profile(fleet: FleetUnderTest, baseline: Baseline) -> None:
    for d in fleet.devices:
        presence = baseline.presence.get(d.id)
        assert presence is not None, f"device {d.id} published no presence"
        assert presence.get("state") == "online", f"device {d.id}: {presence}"
        assert presence.get("profile") == d.profile, f"device {d.id} reported {presence.get('profile')!r}"
    assert baseline.online >= len(fleet.devices), f"the coordinator counted {baseline.online} devices online"


def test_device_receives_task_trains_and_sends_update(fleet: FleetUnderTest, baseline: Baseline) -> None:
    assert [int(r["round"]) for r in baseline.rows] == [1, 2, 3]
    for d in fleet.devices:
        for r in baseline.rows:
            assert d.id in sampled(r), f"round {r['round']} did not task device {d.id}: {r}"
            assert d.id in answered(r), f"device {d.id} did not answer round {r['round']}: {r}"
    assert all(r["test_before_acc"] for r in baseline.rows), "rounds without the devices' evaluation metrics"


def test_device_exports_onnx_and_predicts(fleet: FleetUnderTest, baseline: Baseline, tmp_path: Path) -> None:
    from edge_agent.inference import Predictor

    classes = int(fleet.run_spec.get("num_classes", 0))
    reachable = [d for d in fleet.devices if d.runner is not None]
    if not reachable:
        pytest.skip(fleet.devices[0].no_runner_reason)
    for d in fleet.devices:
        if d.runner is None:
            warnings.warn(f"{d} not checked: {d.no_runner_reason}", stacklevel=1)
    for d in reachable:
        x = fleet.sample_inputs(d, 16)
        np.save(tmp_path / f"inputs-{d.id}.npy", x)
        remote = fleet.put_file(d, tmp_path / f"inputs-{d.id}.npy")
        # the agent exports after its last update went out: give it a moment
        wait_file(lambda d=d: d.run(["test", "-s", d.model_path]).returncode == 0, 60 * fleet.pace,
                  f"{d.model_path} on {d}")
        proc = d.run([*(d.edge_cmd or fleet.edge_cmd), "predict", "--model", d.model_path, "--json", remote])
        assert proc.returncode == 0, f"predict on {d}: {proc.stderr.decode()[-2000:]}"
        predictions = json.loads(proc.stdout)
        assert [p["input"] for p in predictions] == [str(i) for i in range(len(x))]
        for p in predictions:
            assert isinstance(p["class"], int) and p["class"] >= 0, p
            assert not classes or p["class"] < classes, p
            assert math.isfinite(p["probability"]) and 0 < p["probability"] <= 1, p
        # the same file, run here: the device computed what ONNX Runtime computes
        local = tmp_path / f"model-{d.id}.onnx"
        local.write_bytes(d.run(["cat", d.model_path]).stdout)
        expected = [p.label for p in Predictor(local).predict(tmp_path / f"inputs-{d.id}.npy")]
        assert [p["class"] for p in predictions] == expected, f"{d} predicts differently from ONNX Runtime here"


def test_link_cut_mid_round_closes_at_deadline_and_device_rejoins(fleet: FleetUnderTest, tmp_path: Path) -> None:
    fleet.require("coordinator", "link")
    victim = fleet.devices[-1]
    deadline, quorum = 4.0 * fleet.pace, max(1, len(fleet.devices) - 1)
    w = fleet.watcher
    w.watch_tasks(victim.id)
    rounds = 30 if fleet.pace == 1 else max(8, round(30 / fleet.pace))
    run = fleet.coordinator(tmp_path, rounds=rounds, round_deadline=deadline, min_clients=quorum)
    w.wait(lambda: w.next_round() >= 1, RUN_TIMEOUT * fleet.pace, "a first round", fleet.explain)
    seen = len(w.tasks[victim.id])
    w.wait(lambda: len(w.tasks[victim.id]) > seen, 60 * fleet.pace, f"a task for {victim}", fleet.explain)
    cut_at = w.next_round()
    fleet.set_link(victim, up=False)  # while its round runs

    def closed_without_victim() -> bool:
        last = w.status.get("last_round") or {}
        return last.get("round", 0) > cut_at and last["answered"] < last["sampled"]

    try:
        w.wait(closed_without_victim, 120 * fleet.pace, f"a round closed without {victim}", fleet.explain)
    finally:
        fleet.set_link(victim, up=True)
    rows = run.wait(RUN_TIMEOUT * fleet.pace)
    missed = [i for i, r in enumerate(rows) if i >= cut_at and victim.id in sampled(r) and victim.id not in answered(r)]
    assert missed, f"no round after the cut (round {cut_at + 1}) went without {victim}: {rows}"
    row = rows[missed[0]]
    assert float(row["seconds"]) >= deadline, f"the round closed before its deadline: {row}"
    assert len(answered(row)) >= quorum, f"quorum lost: {row}"
    later = rows[missed[-1] + 1 :]
    assert any(victim.id in answered(r) for r in later), (
        f"{victim} did not answer any round after its link came back: {rows}\n{fleet.explain()}")


def test_device_survives_broker_restarts(fleet: FleetUnderTest, tmp_path: Path) -> None:
    """Two restarts in one run: the second catches what only repeats (a birth or will message that a
    receiver has seen once before)."""
    fleet.require("coordinator", "broker_restart")
    w, n = fleet.watcher, len(fleet.devices)
    # ~0.1 s each here: room for the second restart after everyone is back
    rounds = 60 if fleet.pace == 1 else max(12, round(60 / fleet.pace))
    run = fleet.coordinator(tmp_path, rounds=rounds, round_deadline=5.0 * fleet.pace, min_clients=1)
    w.wait(lambda: w.next_round() >= 2, RUN_TIMEOUT * fleet.pace, "two finished rounds", fleet.explain)
    restarts = [w.next_round()]
    fleet.restart_broker()  # mid-run: the coordinator is in round restarts[0] + 1

    def all_back() -> bool:
        last = w.status.get("last_round") or {}
        return last.get("round", 0) > restarts[0] + 1 and last.get("answered") == n
    w.wait(all_back, 120 * fleet.pace, "a round every device answered after the restart", fleet.explain)
    restarts.append(w.next_round())
    fleet.restart_broker()
    rows = run.wait(RUN_TIMEOUT * fleet.pace)
    assert [int(r["round"]) for r in rows] == list(range(1, rounds + 1)), "rounds lost across the broker restarts"
    for k, at in enumerate(restarts):
        after = rows[at + 1 : restarts[k + 1] + 1] if k + 1 < len(restarts) else rows[at + 1 :]
        assert after, f"the run ended before any round after restart {k + 1}"
        for d in fleet.devices:
            if not any(d.id in sampled(r) for r in after):
                # mosquitto sends its clients' last wills when it shuts down: a device that is not 'online'
                # again in its presence after reconnecting is never sampled again
                pytest.fail(f"after broker restart {k + 1} the coordinator never sampled {d} again: it saw its "
                            f"last will ('offline') and no 'online' after the device reconnected: {rows}")
            assert any(d.id in answered(r) for r in after), (
                f"{d} answered no round after broker restart {k + 1}: {rows}\n{fleet.explain()}")


def test_presence_survives_broker_restart(fleet: FleetUnderTest) -> None:
    """After a broker restart every device is online again in its retained presence, so that a coordinator
    (re)started now finds it. Reuses the restarts of test_device_survives_broker_restarts when that ran."""
    fleet.require("broker_restart")
    if not fleet.broker_restarts:
        fleet.restart_broker()
    ids = {d.id for d in fleet.devices}
    presence = fleet.watcher.retained_presence(ids, 10)
    missing = sorted(c for c in ids if presence.get(c, {}).get("state") != "online")
    assert not missing, (f"devices {missing} are not online in their retained presence after the broker restart "
                         f"(retained: {presence}): a coordinator started now would wait for them forever")
