"""`--broker auto` on a machine without mosquitto: the private broker is the embedded amqtt (MQTT 3.1.1),
and a whole run over it (agents in a worker process) gives the same per-round metrics as in memory."""

from __future__ import annotations

from pathlib import Path

import pytest

import protocols.broker as broker_module
from cloud.config import resolve
from cloud.sim.simulate import build_and_run


@pytest.mark.timeout(300)
def test_broker_auto_falls_back_to_amqtt_and_runs_as_in_memory(
    shared_partition: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[broker_module.Broker] = []

    class SeenAmqtt(broker_module.AmqttBroker):
        def start(self, timeout: float = 15.0) -> None:
            started.append(self)
            super().start(timeout)

    monkeypatch.setattr(broker_module, "mosquitto_path", lambda: None)  # as where it is not installed
    monkeypatch.setattr(broker_module, "AmqttBroker", SeenAmqtt)
    values = {
        "algo": "fedcmd",
        "dataset": "mnist5k",
        "partition": shared_partition,
        "join_ratio": 0.06,
        "global_epoch": 2,
        "local_epoch": 1,
        "seed": 9,
        "test_gap": 0,
        "hp": {"selection_rounds": 1},
        "threads": 1,
    }
    memory = build_and_run(resolve({}, dict(values)))
    mqtt = build_and_run(resolve({}, {**values, "transport": "mqtt", "broker": "auto", "workers": 1}))
    assert [b.kind for b in started] == ["amqtt"] and started[0].url.endswith("?protocol=3.1.1")
    assert not started[0].running  # stopped at the end of the run
    assert [r.clients for r in mqtt.records] == [r.clients for r in memory.records]
    assert [r.phase for r in mqtt.records] == ["select", "personal"]
    for a, b in zip(memory.records, mqtt.records, strict=True):
        assert b.answered == a.answered and len(b.answered) == 3
        assert b.metrics == a.metrics, a.round  # the same agents, the same arithmetic: exact
        assert (b.bytes_down, b.bytes_up) == (a.bytes_down, a.bytes_up)
    assert mqtt.final == memory.final
    assert mqtt.strategy_summary["chosen_layer"] == memory.strategy_summary["chosen_layer"]
    assert sum(mqtt.rejected.values()) == 0
