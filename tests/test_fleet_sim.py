"""The same run over the in-memory transport and over a real MQTT broker with agents in worker
processes gives the same per-round accuracies (one torch thread, same seed)."""

from __future__ import annotations

import json
import multiprocessing
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("paho.mqtt")
from cloud.config import resolve
from cloud.sim.fleet import WorkerJob, _worker, publish_run_description
from cloud.sim.simulate import FLEET, SimulationResult, build_and_run, prepare, run_coordinator


# A run over MQTT without spawning: fedcmd's own agent worker (cloud.sim.fleet._worker: every agent its own
# MQTT client and connection, all served by one event loop, each started up from the RunSpec in the retained
# status as a device is) on a thread of this process. What crosses the broker is the same; the spawn, the same
# for every algorithm, is tested by the spawned cases below. A spawned worker costs ~4x the run itself (a torch
# import and a cold first round), which twelve baselines paid over and over.
def _mqtt_run_in_process(values: dict[str, Any], url: str) -> SimulationResult:
    from protocols.mqtt import MqttTransport

    cfg = resolve({}, {**values, "transport": "mqtt", "broker": url})
    p = prepare(cfg)
    transport = MqttTransport(url, f"{FLEET}-coordinator", connect_timeout=10.0)
    publish_run_description(transport, p)
    job = WorkerJob(url=url, protocol=transport.protocol, fleet=FLEET, cids=list(range(p.partition.num_clients)),
                    dataset=cfg.dataset, partition=str(cfg.partition), seed=cfg.seed)
    parent, child = multiprocessing.Pipe()
    worker = threading.Thread(target=_worker, args=(json.dumps(asdict(job)), child, False), daemon=True)
    worker.start()
    try:
        return run_coordinator(p, transport, registration_timeout=120)
    finally:
        parent.send(("stop", {}))
        worker.join(30)
        transport.close()


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("algo", "hp", "spawned"),
    [
        ("fedavg", {}, True),  # agents in two spawned worker processes, as `fedcmd simulate --transport mqtt`
        ("fedcmd", {"selection_rounds": 2}, False),  # the same worker code on a thread (see below)
        ("fedcmd", {"selection_rounds": 1, "body_mode": "relay"}, True),  # the body relayed across processes
    ],
)
def test_memory_and_mqtt_runs_agree(
    shared_partition: Path, mosquitto_broker, algo: str, hp: dict, spawned: bool
) -> None:
    values = {
        "algo": algo,
        "dataset": "mnist5k",
        "partition": shared_partition,
        "join_ratio": 0.1,
        "global_epoch": 4,
        "local_epoch": 1,
        "seed": 9,
        "test_gap": 0,
        "hp": hp,
        "threads": 1,
    }
    memory = build_and_run(resolve({}, dict(values)))
    if spawned:
        mqtt = build_and_run(resolve({}, {**values, "transport": "mqtt", "broker": mosquitto_broker.url, "workers": 2}))
    else:
        mqtt = _mqtt_run_in_process(values, mosquitto_broker.url)
    assert [r.clients for r in mqtt.records] == [r.clients for r in memory.records]
    for a, b in zip(memory.records, mqtt.records):
        assert a.metrics.keys() == b.metrics.keys()
        for key in ("test_before_acc", "test_after_acc"):
            assert b.metrics[key] == pytest.approx(a.metrics[key], abs=1e-6), (a.round, key)
        assert b.bytes_down == a.bytes_down
        assert b.bytes_up == a.bytes_up  # header floats are fixed-width: no timing or last-bit digits in it
    assert mqtt.final["test_before_acc"] == pytest.approx(memory.final["test_before_acc"], abs=1e-6)
    assert mqtt.strategy_summary.get("chosen_layer") == memory.strategy_summary.get("chosen_layer")


# Every other algorithm over MQTT too (agents on a thread, _mqtt_run_in_process): 4 rounds, with warm-ups and
# selection short enough that both phases of a two-phase method cross the broker. Same per-round accuracies as
# the in-memory run.
TWO_PHASE = {"warmup_round": 2}
OVER_MQTT = [
    ("local", {}),
    ("fedper", {}),
    ("pfedsim", TWO_PHASE),
    ("fedprox", {}),
    ("feddyn", {}),
    ("fedbn", {}),
    ("fedap", TWO_PHASE),
    ("fedbabu", {}),
    ("fedfomo", {}),
    ("fedrep", {}),
    ("lgfedavg", {}),
    ("fedcmd_noweight", {"selection_rounds": 2}),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("algo", "hp"), OVER_MQTT, ids=[a for a, _ in OVER_MQTT])
def test_every_baseline_runs_over_mqtt_as_in_memory(
    shared_partition: Path, mosquitto_broker, algo: str, hp: dict
) -> None:
    values = {
        "algo": algo,
        "dataset": "mnist5k",
        "partition": shared_partition,
        "join_ratio": 0.1,
        "global_epoch": 4,
        "local_epoch": 1,
        "seed": 3,
        "test_gap": 0,
        "hp": hp,
        "threads": 1,
    }
    memory = build_and_run(resolve({}, dict(values)))
    mqtt = _mqtt_run_in_process(values, mosquitto_broker.url)
    assert len(mqtt.records) == 4
    assert [r.phase for r in mqtt.records] == [r.phase for r in memory.records]
    for a, b in zip(memory.records, mqtt.records):
        assert b.clients == a.clients
        assert b.metrics["test_before_acc"] == pytest.approx(a.metrics["test_before_acc"], abs=1e-6), a.round
        assert b.bytes_down == a.bytes_down
        assert b.bytes_up == a.bytes_up  # header floats are fixed-width: no timing or last-bit digits in it
