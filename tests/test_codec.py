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


def test_frame_length_does_not_depend_on_float_values() -> None:
    """Byte counts repeat run to run: a float's digits (wall-clock fit_seconds, a loss's last bit) never
    change a frame's length, and every float still decodes to exactly the value sent."""
    arrays = {"w": np.ones(3, dtype=np.float32)}
    values = [0.0, 0.1, 0.012345678901234567, 1.0, 123456.789, 1e-300, -2.2250738585072014e-308, 5e-324, 1e7]
    lengths = set()
    for v in values:
        metrics = {"fit_seconds": v, "test_before_loss": -v, "test_before_correct": 3, "xs": [v, 2.5]}
        header = Header(type="update", fleet="f", round=1, client=2, payload={"metrics": metrics})
        frame = encode(header, arrays)
        lengths.add(len(frame))
        h, _ = decode(frame)
        assert h.payload["metrics"] == metrics  # exact, integers stay integers
    assert len(lengths) == 1
    with_inf = decode(encode(Header(type="task", fleet="f", payload={"lr": float("inf")})))[0]
    assert with_inf.payload == {"lr": None}  # as pydantic's JSON always wrote it


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
