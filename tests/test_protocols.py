"""Wire format: codecs, chunking and reassembly, topics, presence (no broker needed)."""

from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.chunking import MAGIC, ChunkError, Reassembler, parse_chunk, split
from protocols.codec import SCALE_SUFFIX, DecodeError, Header, decode, encode
from protocols.topics import (
    parse_client_topic,
    parse_presence,
    presence_filter,
    presence_payload,
    presence_topic,
    status_topic,
    task_topic,
    update_topic,
    updates_filter,
)

HEADER = Header(type="update", fleet="f", round=3, client=7, num_samples=11, payload={"votes": {"fc1": 2}})


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "fc1.weight": rng.normal(size=(64, 32)).astype(np.float32),
        "fc1.bias": rng.normal(scale=1e-3, size=32).astype(np.float64),
        "bn.num_batches_tracked": np.array(17, dtype=np.int64),
        "zeros": np.zeros(5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


# ------------------------------------------------------------------------------------------- codecs
def test_fp16_round_trip_within_half_precision() -> None:
    arrays = _arrays()
    header, out = decode(encode(HEADER, arrays, codec="fp16"))
    assert header.codec == "fp16" and header.model_copy(update={"codec": "none"}) == HEADER
    for key, value in arrays.items():
        if value.dtype.kind == "f":
            assert out[key].dtype == np.float32 and out[key].shape == value.shape
            # float16 keeps 11 significant bits: relative error <= 2**-11 (normal range)
            np.testing.assert_allclose(out[key], value, rtol=2**-11, atol=1e-7)
        else:
            assert out[key].dtype == value.dtype and np.array_equal(out[key], value)
    assert len(encode(HEADER, arrays, codec="fp16")) < 0.6 * len(encode(HEADER, arrays))


def test_int8_round_trip_error_is_half_a_step() -> None:
    arrays = _arrays()
    frame = encode(HEADER, arrays, codec="int8")
    header, out = decode(frame)
    assert header.codec == "int8"
    assert not any(k.endswith(SCALE_SUFFIX) for k in out)  # scales are consumed
    assert set(out) == set(arrays)
    for key, value in arrays.items():
        if value.dtype.kind == "f":
            step = float(np.abs(value).max(initial=0.0)) / 127.0
            assert out[key].dtype == np.float32
            assert float(np.abs(out[key] - value).max(initial=0.0)) <= step / 2 * (1 + 1e-5) + 1e-12
        else:
            assert np.array_equal(out[key], value) and out[key].dtype == value.dtype
    assert np.array_equal(out["zeros"], np.zeros(5, dtype=np.float32))
    assert len(frame) < 0.4 * len(encode(HEADER, arrays))


def test_header_codec_is_the_default_codec() -> None:
    header, out = decode(encode(HEADER.model_copy(update={"codec": "fp16"}), {"w": np.ones(3)}))
    assert header.codec == "fp16" and out["w"].dtype == np.float32


@pytest.mark.parametrize(
    ("arrays", "codec", "match"),
    [
        ({"w": np.ones(2)}, "bf16", "unknown codec"),
        ({"w::scale": np.ones(1, dtype=np.float32)}, "none", "reserved suffix"),
        ({"w": np.array([1.0, np.nan], dtype=np.float32)}, "int8", "non-finite"),
        ({"w": np.array([1e6], dtype=np.float32)}, "fp16", "float16 range"),
        ({"w": np.ones(2, dtype=np.int8)}, "int8", "is int8"),
    ],
)
def test_encode_refuses_what_a_codec_cannot_carry(arrays: dict[str, np.ndarray], codec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode(HEADER, arrays, codec=codec)  # type: ignore[arg-type]


def _raw_frame(arrays: dict[str, np.ndarray], header: dict[str, object]) -> bytes:
    """A frame built by hand, bypassing encode's checks: what a buggy or hostile sender could send."""
    from safetensors.numpy import save

    return save(arrays, metadata={"fedcmd": json.dumps(header)})


@pytest.mark.parametrize(
    ("arrays", "codec", "match"),
    [
        ({"w": np.ones(2, dtype=np.int8)}, "int8", "no ::scale entry"),
        ({"w": np.ones(2, dtype=np.int8), "w::scale": np.array(np.inf, dtype=np.float32)}, "int8", "not a finite"),
        ({"w": np.ones(2, dtype=np.int8), "w::scale": np.array(np.nan, dtype=np.float32)}, "int8", "not a finite"),
        ({"w": np.ones(2, dtype=np.int8), "w::scale": np.array(-1.0, dtype=np.float32)}, "int8", "not a finite"),
        ({"w": np.ones(2, dtype=np.int8), "w::scale": np.ones(2, dtype=np.float32)}, "int8", "must be one float32"),
        ({"w": np.ones(2, dtype=np.int8), "w::scale": np.array(1.0, dtype=np.float64)}, "int8", "must be one float32"),
        ({"w::scale": np.array(1.0, dtype=np.float32)}, "int8", "no int8 tensor"),
        ({"w": np.ones(2, dtype=np.int8), "w::scale": np.array(1.0, dtype=np.float32)}, "none", "scale entries"),
        ({"w": np.ones(2, dtype=np.float32)}, "lz4", "bad header"),
    ],
)
def test_decode_rejects_bad_quantisation(arrays: dict[str, np.ndarray], codec: str, match: str) -> None:
    frame = _raw_frame(arrays, {"type": "update", "fleet": "f", "codec": codec})
    with pytest.raises(DecodeError, match=match):
        decode(frame)


@pytest.mark.parametrize("meta", [b"[]", b'{"__metadata__": {"fedcmd": 5}}', b"[" * 5000 + b"]" * 5000])
def test_decode_rejects_odd_headers(meta: bytes) -> None:
    frame = len(meta).to_bytes(8, "little") + meta
    with pytest.raises(DecodeError):
        decode(frame)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2048))
def test_fuzz_decode_random_bytes(data: bytes) -> None:
    try:
        decode(data)
    except DecodeError:
        pass


_GOOD_FRAMES = [encode(HEADER, _arrays(s), codec=c) for s, c in [(0, "none"), (1, "fp16"), (2, "int8")]]


@settings(max_examples=400, deadline=None)
@given(which=st.integers(0, 2), cut=st.integers(0, 10**6), flips=st.lists(st.integers(0, 10**6), max_size=4))
def test_fuzz_decode_mutated_frames(which: int, cut: int, flips: list[int]) -> None:
    frame = bytearray(_GOOD_FRAMES[which])
    for f in flips:  # bit flips anywhere, header included
        frame[f % len(frame)] ^= 1 << (f % 8)
    frame = frame[: cut % (len(frame) + 1)] if cut % 3 == 0 else frame
    try:
        header, arrays = decode(bytes(frame))
    except DecodeError:
        return
    assert isinstance(header, Header) and all(isinstance(v, np.ndarray) for v in arrays.values())


# ------------------------------------------------------------------------------------------ chunking
@pytest.mark.parametrize("limit", [256, 1000, 4096])
def test_split_and_reassemble_sizes_around_the_limit(limit: int) -> None:
    rng = random.Random(limit)
    sizes = [0, 1, limit - 200, limit - 120, limit, limit + 1, 2 * limit, 7 * limit + 3]
    sizes += [rng.randrange(0, 20 * limit) for _ in range(20)]
    for size in sizes:
        frame = os.urandom(size)
        chunks = split(frame, limit)
        assert all(len(c) <= limit for c in chunks), (size, max(map(len, chunks)))
        assert all(c.startswith(MAGIC) for c in chunks)
        r = Reassembler()
        outs = [r.feed("t", c) for c in chunks]
        assert outs[-1] == frame and all(o is None for o in outs[:-1])
        assert r.pending == 0 and r.pending_bytes == 0


def test_small_frame_is_one_enveloped_chunk() -> None:
    (chunk,) = split(b"hello", 256 * 1024)
    meta, data = parse_chunk(chunk)
    assert data == b"hello" and (meta.i, meta.n, meta.size) == (0, 1, 5)
    assert meta.sha256 == hashlib.sha256(b"hello").hexdigest() and len(meta.id) == 16


def test_out_of_order_and_duplicate_chunks() -> None:
    frame = os.urandom(50_000)
    chunks = split(frame, 1024)
    order = chunks + chunks[::3]  # duplicates
    random.Random(1).shuffle(order)
    r = Reassembler()
    results = [r.feed("t", c) for c in order]
    done = [x for x in results if x is not None]
    assert done == [frame]  # exactly once, even though some chunks came twice
    assert r.counters["duplicates"] == len(chunks[::3]) and r.counters["messages"] == 1
    # a QoS 1 redelivery of the whole message after completion is dropped too ...
    assert all(r.feed("t", c) is None for c in chunks)
    # ... unless it is a retained replay, which must reach a new subscriber
    replay = [r.feed("t", c, dedupe=False) for c in chunks]
    assert replay[-1] == frame


def test_same_id_on_two_topics_are_two_streams() -> None:
    a, b = split(b"a" * 600, 256, msg_id="00" * 8), split(b"b" * 600, 256, msg_id="00" * 8)
    r = Reassembler()
    outs = [r.feed("x", ca) for ca in a] + [r.feed("y", cb) for cb in b]
    assert [o for o in outs if o] == [b"a" * 600, b"b" * 600]


def test_sha_mismatch_is_rejected() -> None:
    chunks = split(os.urandom(3000), 512)
    last = bytearray(chunks[-1])
    last[-1] ^= 0xFF  # corrupt the data, keep the envelope
    r = Reassembler()
    for c in chunks[:-1]:
        assert r.feed("t", c) is None
    with pytest.raises(ChunkError, match="sha256 mismatch") as e:
        r.feed("t", bytes(last))
    assert e.value.kind == "integrity" and r.counters["rejected:integrity"] == 1 and r.pending == 0


def test_chunks_that_disagree_drop_their_stream() -> None:
    a = split(os.urandom(2000), 512, msg_id="ab" * 8)
    b = split(os.urandom(2000), 512, msg_id="ab" * 8)  # same id, other sha256
    r = Reassembler()
    r.feed("t", a[0])
    with pytest.raises(ChunkError, match="disagrees") as e:
        r.feed("t", b[1])
    assert e.value.kind == "mismatch" and r.pending == 0


def test_incomplete_stream_expires_with_a_reason() -> None:
    chunks = split(os.urandom(5000), 1024)
    r = Reassembler(timeout_s=5.0)
    r.feed("fedcmd/f/client/3/update", chunks[0], now=100.0)
    r.feed("fedcmd/f/client/3/update", chunks[2], now=101.0)
    assert r.expire(now=104.0) == []
    (reason,) = r.expire(now=106.0)
    assert "client/3/update" in reason and f"2 of {len(chunks)} chunks" in reason
    assert r.pending == 0 and r.pending_bytes == 0 and r.counters["expired"] == 1


def test_oversize_messages_are_rejected() -> None:
    r = Reassembler(max_message_bytes=10_000)
    with pytest.raises(ChunkError, match="exceeds the limit") as e:
        r.feed("t", split(os.urandom(10_001), 4096)[0])
    assert e.value.kind == "oversize"
    assert r.feed("t", split(os.urandom(10_000), 20_000)[0]) is not None
    # several incomplete streams may not pin more than max_pending_bytes between them: the oldest makes room
    r = Reassembler(max_message_bytes=10_000, max_pending_bytes=8_000)
    r.feed("t", split(os.urandom(10_000), 9_000)[0])
    assert r.feed("u", split(os.urandom(10_000), 9_000)[0]) is None  # t's older stream made room
    assert r.dropped["global_bytes"] == 1 and r.pending == 1
    r = Reassembler(max_message_bytes=10_000, max_pending_bytes=4_000)
    with pytest.raises(ChunkError) as e:  # one chunk larger than everything allowed
        r.feed("u", split(os.urandom(10_000), 9_000)[0])
    assert e.value.kind == "pending_limit"


def test_chunk_that_carries_more_than_declared_is_rejected() -> None:
    chunks = split(os.urandom(1000), 256)
    r = Reassembler()
    r.feed("t", chunks[0])
    with pytest.raises(ChunkError):
        r.feed("t", chunks[1] + b"extra" * 300)


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"hello",
        b"FCH1",
        b"FCH1\xff\xff{}",
        b"FCH1\x00\x02{}",
        b"FCH1\x00\x05[1,2]",
        MAGIC + b"\x00\x10" + b'{"id":"x"}      ',
    ],
)
def test_bad_envelopes(junk: bytes) -> None:
    with pytest.raises(ChunkError) as e:
        Reassembler().feed("t", junk)
    assert e.value.kind == "envelope"


@pytest.mark.parametrize(
    "meta",
    [
        {"id": "0" * 16, "i": 1, "n": 1, "size": 3, "sha256": "0" * 64},
        {"id": "0" * 16, "i": 0, "n": 5, "size": 3, "sha256": "0" * 64},
        {"id": "0" * 16, "i": True, "n": 2, "size": 3, "sha256": "0" * 64},
        {"id": "0" * 15, "i": 0, "n": 1, "size": 3, "sha256": "0" * 64},
        {"id": "0" * 16, "i": 0, "n": 1, "size": -3, "sha256": "0" * 64},
        {"id": "0" * 16, "i": 0, "n": 1, "size": 3, "sha256": "0" * 64, "extra": 1},
        {"id": "0" * 16, "i": 0, "n": 1, "size": 3},
    ],
)
def test_inconsistent_envelopes(meta: dict[str, object]) -> None:
    raw = json.dumps(meta).encode()
    with pytest.raises(ChunkError):
        Reassembler().feed("t", MAGIC + len(raw).to_bytes(2, "big") + raw + b"abc")


def test_split_refuses_a_tiny_limit() -> None:
    with pytest.raises(ValueError):
        split(b"x", 100)


_GOOD_CHUNKS = split(os.urandom(3000), 1024)


@settings(max_examples=400, deadline=None)
@given(
    junk=st.binary(max_size=600),
    which=st.integers(0, 2),
    cut=st.integers(0, 2000),
    flips=st.lists(st.integers(0, 10**6), max_size=3),
    mode=st.integers(0, 2),
)
def test_fuzz_reassembler(junk: bytes, which: int, cut: int, flips: list[int], mode: int) -> None:
    r = Reassembler(max_message_bytes=1 << 20)
    chunk = bytearray(_GOOD_CHUNKS[which])
    for f in flips:
        chunk[f % len(chunk)] ^= 1 << (f % 8)
    inputs = [junk, bytes(chunk[:cut]) if mode == 1 else bytes(chunk), MAGIC + junk]
    inputs += [c for k, c in enumerate(_GOOD_CHUNKS) if k != which]
    for data in inputs:
        try:
            out = r.feed("t", data)
        except ChunkError as e:
            assert e.kind in {"envelope", "mismatch", "oversize", "integrity", "pending_limit"}
        else:
            assert out is None or hashlib.sha256(out).hexdigest() == parse_chunk(_GOOD_CHUNKS[0])[0].sha256
    r.expire(now=float("inf"))
    assert r.pending == 0 and r.pending_bytes == 0


# ------------------------------------------------------------------------------------ topics/presence
def test_topics_and_client_parsing() -> None:
    assert task_topic("f", 7) == "fedcmd/f/client/7/task"
    assert update_topic("f", np.int64(7)) == "fedcmd/f/client/7/update"  # type: ignore[arg-type]
    assert presence_topic("f", 0) == "fedcmd/f/client/0/presence"
    assert updates_filter("f") == "fedcmd/f/client/+/update"
    assert presence_filter("f") == "fedcmd/f/client/+/presence"
    assert status_topic("f") == "fedcmd/f/status"
    assert parse_client_topic("fedcmd/f/client/12/update") == ("f", 12, "update")
    for bad in ["fedcmd/f/client/012/update", "fedcmd/f/client/-1/update", "fedcmd/f/client/1/x", "a/b"]:
        with pytest.raises(ValueError):
            parse_client_topic(bad)
    for fleet in ["", "a/b", "a+", "#", "x" * 65]:
        with pytest.raises(ValueError):
            task_topic(fleet, 1)
    for client in [-1, True, 1.5, "3"]:
        with pytest.raises(ValueError):
            task_topic("f", client)  # type: ignore[arg-type]


def test_presence_payloads() -> None:
    doc = parse_presence(presence_payload(4, "online", profile="rpi4"))
    assert doc == {"state": "online", "client": 4, "profile": "rpi4"}
    assert json.loads(presence_payload(4, "offline")) == {"state": "offline", "client": 4}
    assert parse_presence(presence_payload(4, "unhealthy", reason="disk full"))["reason"] == "disk full"
    with pytest.raises(ValueError):
        presence_payload(4, "online", host="pi")  # a bounded schema: no other fields
    for bad in [b"", b"[]", b'{"state":"away","client":1}', b'{"state":"online","client":"1"}', b"\xff",
                b'{"state":"online","client":1,"host":"pi"}', b'{"state":"online","client":1,"profile":"' +
                b"x" * 33 + b'"}', b'{"state":"online","client":1,"profile":"a b"}']:
        with pytest.raises(ValueError):
            parse_presence(bad)
