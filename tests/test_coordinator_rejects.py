"""Every bad update is rejected with a reason and a counter, never reaching the aggregate."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.service.coordinator import Coordinator, RoundSettings
from fedcmd_core.runspec import RunSpec, build_server
from fedcmd_core.strategies import Task
from protocols.codec import Header, encode
from protocols.memory import MemoryTransport
from protocols.topics import update_topic


@pytest.fixture
def coordinator() -> Coordinator:
    spec = RunSpec(algo="fedavg", input_shape=(1, 28, 28), num_classes=10, num_clients=4, global_epoch=2)
    settings = RoundSettings(num_clients=4, global_epoch=2, join_ratio=0.5, seed=0, local_epoch=1,
                             max_update_bytes=2_000_000)
    c = Coordinator(MemoryTransport(), build_server(spec), "f", settings)
    sent = _good(c)
    c.current_round, c.inbox = 0, {}
    c.asked = {cid: Task(0, "fit", sent, {"upload": list(sent)}) for cid in (1, 2)}
    return c


def _good(c: Coordinator) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in c.strategy.ctx.spec.initial.items() if k.startswith("fc2")}


def _send(c: Coordinator, topic_client: int, header: Header, arrays: dict | None, raw: bytes | None = None) -> None:
    c.transport.publish(update_topic("f", topic_client), raw if raw is not None else encode(header, arrays))
    c.transport.run_until(lambda: False)


def test_each_bad_update_gets_its_reason(coordinator: Coordinator) -> None:
    c = coordinator
    h = Header(type="update", fleet="f", round=0, client=1, num_samples=5, kind="fit", run=c.run_id)
    good = _good(c)
    _send(c, 1, h, None, raw=b"\x00\x01junk")
    _send(c, 1, h.model_copy(update={"fleet": "other"}), good)
    _send(c, 2, h, good)  # client 1's update published on client 2's topic
    _send(c, 1, h.model_copy(update={"round": 1}), good)
    _send(c, 3, h.model_copy(update={"client": 3}), good)
    _send(c, 1, h, {**good, "fc9.weight": np.zeros(3, dtype=np.float32)})
    _send(c, 1, h, {**good, "fc2.0.weight": np.zeros((3, 3), dtype=np.float32)})
    _send(c, 1, h, {**good, "fc2.0.weight": good["fc2.0.weight"].astype(np.int32)})
    nan = {k: v.copy() for k, v in good.items()}
    nan["fc2.0.bias"][0] = np.nan
    _send(c, 1, h, nan)
    _send(c, 1, h, None, raw=b"x" * 2_000_001)
    assert c.inbox == {}
    assert dict(c.rejected) == {
        "malformed": 1, "wrong_fleet": 1, "spoofed_client": 1, "wrong_round": 1, "unexpected_client": 1,
        "bad_tensors": 3, "non_finite": 1, "oversized": 1,
    }
    _send(c, 1, h, good)
    _send(c, 1, h, good)
    assert set(c.inbox) == {1} and c.rejected["duplicate"] == 1


def test_presence_registers_devices_with_their_profiles(coordinator: Coordinator) -> None:
    import json

    from protocols.topics import presence_payload, presence_topic, status_topic

    t = coordinator.transport
    status: list[dict] = []
    t.subscribe(status_topic("f"), lambda topic, p: status.append(json.loads(p)))
    t.publish(presence_topic("f", 1), presence_payload(1, "online", profile="rpi4"), retain=True)
    t.publish(presence_topic("f", 2), presence_payload(2, "online", profile="jetson-orin"), retain=True)
    t.publish(presence_topic("f", 3), presence_payload(3, "online"), retain=True)  # an agent without --profile
    t.publish(presence_topic("f", 0), presence_payload(2, "online"), retain=True)  # spoofs device 2's presence
    t.publish(presence_topic("f", 2), b"{not json", retain=True)
    t.run_until(lambda: False)
    assert coordinator.online == {1, 2, 3}
    assert coordinator.rejected["bad_presence"] == 1 and coordinator.rejected["spoofed_client"] == 1
    coordinator.publish_status("waiting")
    t.run_until(lambda: False)
    assert status[-1]["online"] == 3 and status[-1]["profiles"] == {"rpi4": 1, "jetson-orin": 1}
    t.publish(presence_topic("f", 1), presence_payload(1, "offline"), retain=True)
    t.run_until(lambda: False)
    coordinator.publish_status("running")
    t.run_until(lambda: False)
    assert status[-1]["profiles"] == {"jetson-orin": 1}


def test_a_flood_of_rejects_is_counted_but_not_logged_line_by_line(coordinator: Coordinator, caplog) -> None:
    import logging

    with caplog.at_level(logging.WARNING, logger="fedcmd.cloud"):
        for _ in range(2000):
            coordinator.transport.publish(update_topic("f", 1), b"\x00junk")
        coordinator.transport.run_until(lambda: False)
    assert coordinator.rejected["malformed"] == 2000
    lines = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(lines) == 5 + 2  # the first five, then the 1000th and the 2000th with the running count
    assert "[2000 of these so far]" in lines[-1].getMessage()
