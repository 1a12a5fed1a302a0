"""The same run over the in-memory transport and over a real MQTT broker with agents in worker
processes gives the same per-round accuracies (one torch thread, same seed)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("paho.mqtt")
from cloud.config import resolve
from cloud.simulate import build_and_run


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("algo", "hp"),
    [("fedavg", {}), ("fedcmd", {"selection_rounds": 2}), ("fedcmd", {"selection_rounds": 1, "body_mode": "relay"})],
)
def test_memory_and_mqtt_runs_agree(shared_partition: Path, mosquitto_broker, algo: str, hp: dict) -> None:
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
    mqtt = build_and_run(resolve({}, {**values, "transport": "mqtt", "broker": mosquitto_broker.url, "workers": 2}))
    assert [r.clients for r in mqtt.records] == [r.clients for r in memory.records]
    for a, b in zip(memory.records, mqtt.records):
        assert a.metrics.keys() == b.metrics.keys()
        for key in ("test_before_acc", "test_after_acc"):
            assert b.metrics[key] == pytest.approx(a.metrics[key], abs=1e-6), (a.round, key)
        assert b.bytes_down == a.bytes_down
        assert b.bytes_up == a.bytes_up  # header floats are fixed-width: no timing or last-bit digits in it
    assert mqtt.final["test_before_acc"] == pytest.approx(memory.final["test_before_acc"], abs=1e-6)
    assert mqtt.strategy_summary.get("chosen_layer") == memory.strategy_summary.get("chosen_layer")


# Every other algorithm over MQTT too: 4 rounds, with warm-ups and selection short enough that both phases
# of a two-phase method cross the broker. Same per-round accuracies as the in-memory run.
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
    mqtt = build_and_run(resolve({}, {**values, "transport": "mqtt", "broker": mosquitto_broker.url, "workers": 1}))
    assert len(mqtt.records) == 4
    assert [r.phase for r in mqtt.records] == [r.phase for r in memory.records]
    for a, b in zip(memory.records, mqtt.records):
        assert b.clients == a.clients
        assert b.metrics["test_before_acc"] == pytest.approx(a.metrics["test_before_acc"], abs=1e-6), a.round
        assert b.bytes_down == a.bytes_down
        assert b.bytes_up == a.bytes_up  # header floats are fixed-width: no timing or last-bit digits in it
