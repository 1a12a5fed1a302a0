"""Fault tolerance over a real broker with real processes: the coordinator killed with SIGKILL in the
middle of a round resumes from its checkpoint; an agent killed mid-round leaves the round to close at its
deadline with quorum, and rejoins when restarted."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("paho.mqtt")

BIN = Path(sys.executable).parent


def _serve_config(tmp: Path, url: str, rounds: int, local_epoch: int = 1, **extra: object) -> Path:
    cfg = {
        "fleet": "faults", "broker": url, "checkpoint": str(tmp / "ckpt.safetensors"), "out": str(tmp / "out"),
        "join_ratio": 0.06, "min_clients": 2, "round_deadline": 8.0, "wait_clients": 3,
        "registration_timeout": 120.0,
    }
    cfg.update(extra)
    lines = [f"{k} = {json.dumps(v)}" for k, v in cfg.items()]  # TOML accepts these JSON scalars
    lines += ["[run]", 'algo = "fedcmd"', "input_shape = [1, 28, 28]", "num_classes = 10", "num_clients = 50",
              f"global_epoch = {rounds}", f"local_epoch = {local_epoch}", "seed = 4",
              "[run.hp]", "selection_rounds = 2"]
    path = tmp / "cloud.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _agent(url: str, cid: int, partition: Path, tmp: Path) -> subprocess.Popen:
    log = open(tmp / f"agent-{cid}.log", "ab")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        [str(BIN / "fedcmd-edge"), "run", "--broker", url, "--client-id", str(cid), "--data", str(partition),
         "-d", "mnist5k", "--state-dir", str(tmp / f"state-{cid}"), "--fleet", "faults", "--wait", "120"],
        stdout=log, stderr=subprocess.STDOUT,
    )


def _serve(config: Path, tmp: Path) -> subprocess.Popen:
    log = open(tmp / "serve.log", "ab")  # noqa: SIM115
    return subprocess.Popen([str(BIN / "fedcmd"), "cloud", "serve", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT)


def _status(url: str) -> dict:
    from protocols.mqtt import MqttTransport
    from protocols.topics import status_topic

    t = MqttTransport(url, f"probe-{time.monotonic_ns()}")
    got: dict = {}
    t.subscribe(status_topic("faults"), lambda topic, p: got.update(json.loads(p)))
    t.run_until(lambda: bool(got), 5)
    t.close()
    return got


def _wait(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _rows(tmp: Path) -> list[dict]:
    return list(csv.DictReader((tmp / "out" / "metrics.csv").open()))


@pytest.mark.timeout(600)
def test_coordinator_killed_mid_round_resumes_without_losing_rounds(
    tmp_path: Path, shared_partition: Path, mosquitto_broker
) -> None:
    url = mosquitto_broker.url
    config = _serve_config(tmp_path, url, rounds=6)
    agents = [_agent(url, c, shared_partition, tmp_path) for c in range(3)]
    serve = _serve(config, tmp_path)
    try:
        _wait(lambda: _status(url).get("next_round", 0) >= 3, 300, "three finished rounds")
        time.sleep(0.3)  # into round 4
        os.kill(serve.pid, signal.SIGKILL)
        serve.wait(10)
        from fedcmd_core.state_tree import load_state_file

        saved, _ = load_state_file(tmp_path / "ckpt.safetensors")
        done_before_kill = int(saved["next_round"])
        assert done_before_kill >= 3
        serve = _serve(config, tmp_path)
        assert serve.wait(300) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        rows = _rows(tmp_path)
        assert [int(r["round"]) for r in rows] == [1, 2, 3, 4, 5, 6]
        assert "resumed from" in (tmp_path / "serve.log").read_text()
        assert all(r["answered"] for r in rows)
    finally:
        for p in [serve, *agents]:
            if p.poll() is None:
                p.kill()


@pytest.mark.timeout(600)
def test_agent_killed_mid_round_round_closes_once_its_will_arrives_and_agent_rejoins(
    tmp_path: Path, shared_partition: Path, mosquitto_broker
) -> None:
    from protocols.codec import decode
    from protocols.mqtt import MqttTransport
    from protocols.topics import task_topic

    url = mosquitto_broker.url
    deadline = 10.0
    # enough rounds (~0.3 s each) for the restarted agent to come back (it imports torch) before the end
    # 5 local epochs: the agent is still training when the kill lands right after its task arrives
    config = _serve_config(tmp_path, url, rounds=120, local_epoch=5, round_deadline=deadline)
    agents = [_agent(url, c, shared_partition, tmp_path) for c in range(3)]
    serve = _serve(config, tmp_path)
    probe = MqttTransport(url, "probe-tasks")
    tasked: list[int] = []
    probe.subscribe(task_topic("faults", 2), lambda t, p: tasked.append(decode(p)[0].round))
    try:
        _wait(lambda: _status(url).get("next_round", 0) >= 2, 300, "two finished rounds")
        probe.run_until(lambda: False, 0.5)  # deliver what the probe already queued, then forget it
        tasked.clear()
        assert probe.run_until(lambda: bool(tasked), 120), "agent 2 was never tasked"
        os.kill(agents[2].pid, signal.SIGKILL)  # while it trains on its task
        killed_round = tasked[-1]
        agents[2].wait(10)
        _wait(lambda: _status(url).get("next_round", 0) >= killed_round + 3, 120, "rounds without agent 2")
        agents[2] = _agent(url, 2, shared_partition, tmp_path)  # same state dir: it rejoins
        _wait(lambda: _status(url).get("online", 0) >= 3, 120, "agent 2 back online")
        assert serve.wait(300) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        rows = _rows(tmp_path)
        assert len(rows) == 120
        row = rows[killed_round]
        assert "2" in row["sampled"].split() and "2" not in row["answered"].split()
        assert len(row["answered"].split()) >= 2  # quorum held: the round was aggregated
        # its last will said offline: the round closed after the offline grace (5 s), not at the 10 s deadline
        assert 5.0 <= float(row["seconds"]) < deadline
        later = [set(r["answered"].split()) for r in rows[killed_round + 1 :]]
        assert any("2" in a for a in later), "the restarted agent did not rejoin"
        assert (tmp_path / "state-2" / "client-2.state.safetensors").is_file()
    finally:
        probe.close()
        for p in [serve, *agents]:
            if p.poll() is None:
                p.kill()
