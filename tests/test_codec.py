from __future__ import annotations

import numpy as np
import pytest

from protocols.codec import DecodeError, Header, decode, encode
from protocols.memory import MemoryTransport
from protocols.topics import matches


def test_round_trip_keeps_header_and_tensors() -> None:
    arrays = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3, dtype=np.int64)}
    header = Header(type="update", fleet="f", round=4, client=2, num_samples=9, payload={"votes": {"fc2": 3}})
    h, out = decode(encode(header, arrays))
    assert h == header
    assert np.array_equal(out["a.weight"], arrays["a.weight"]) and out["a.weight"].dtype == np.float32
    assert int(out["n"].reshape(-1)[0]) == 3


@pytest.mark.parametrize("cut", [0, 5, 20, -10])
def test_truncated_frames_are_rejected(cut: int) -> None:
    frame = encode(Header(type="task", fleet="f"), {"x": np.zeros(100, dtype=np.float32)})
    with pytest.raises(DecodeError):
        decode(frame[:cut])


def test_unknown_schema_version_is_rejected() -> None:
    frame = encode(Header(type="task", fleet="f", schema_version=99))
    with pytest.raises(DecodeError, match="unknown schema version 99"):
        decode(frame)


def test_topic_matching() -> None:
    assert matches("fedcmd/a/client/+/update", "fedcmd/a/client/7/update")
    assert not matches("fedcmd/a/client/+/update", "fedcmd/a/client/7/task")
    assert matches("fedcmd/#", "fedcmd/a/status")
    assert not matches("fedcmd/a/+", "fedcmd/a/b/c")


def test_memory_transport_delivers_in_order_without_recursion() -> None:
    t = MemoryTransport()
    seen: list[str] = []

    def echo(topic: str, payload: bytes) -> None:
        seen.append(payload.decode())
        if payload == b"ping":
            t.publish("b", b"pong")

    t.subscribe("a", echo)
    t.subscribe("b", lambda topic, p: seen.append(p.decode()))
    t.publish("a", b"ping")
    t.publish("a", b"second")
    assert seen == []  # nothing is delivered inside publish
    assert t.run_until(lambda: len(seen) == 3)
    assert seen == ["ping", "second", "pong"]
    t.publish("s", b"retained", retain=True)
    t.run_until(lambda: False)
    late: list[bytes] = []
    t.subscribe("s", lambda topic, p: late.append(p))
    t.run_until(lambda: bool(late))
    assert late == [b"retained"]
