# ruff: noqa: F811  (pytest fixtures imported from tests/brokers.py are parameters of the same name)
"""Per-sender limits of the chunk reassembler (issue 10, item 7): one sender flooding incomplete chunk
streams pins at most its own share of memory, never the legitimate senders' messages, and the receiver's
memory stays bounded. Pure reassembler tests first, then a real flood at an MqttTransport over mosquitto."""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from brokers import mosquitto_broker  # noqa: F401

from protocols.broker import Broker
from protocols.chunking import MAGIC, ChunkError, Reassembler, default_limits, split
from protocols.mqtt import MqttTransport

HOSTILE = "fedcmd/t/client/9/update"
LEGIT = "fedcmd/t/client/1/update"
MiB = 1024 * 1024


def junk_chunk(
    data_bytes: int, *, size: int, n: int, i: int = 0, msg_id: str | None = None, sha: str = "ab" * 32
) -> bytes:
    """A well-formed chunk of a message that will never complete (a made-up sha256, the rest never sent)."""
    import json

    meta = {"id": msg_id or secrets.token_hex(8), "i": i, "n": n, "size": size, "sha256": sha}
    raw = json.dumps(meta, separators=(",", ":")).encode()
    return MAGIC + len(raw).to_bytes(2, "big") + raw + os.urandom(data_bytes)


def streams_of(r: Reassembler, topic: str) -> list[str]:
    """Ids of the pending streams of one sender, oldest first."""
    return [msg_id for t, msg_id in r._streams if t == topic]


def check_bounded(r: Reassembler, *topics: str) -> None:
    assert r.pending_bytes <= r.max_pending_bytes
    for topic in topics:
        assert r.sender_bytes(topic) <= r.max_sender_bytes, topic


def test_defaults_fit_two_whole_messages_per_sender() -> None:
    assert default_limits(128 * MiB) == (256 * MiB, 4, 1024 * MiB)
    assert default_limits(MiB) == (2 * MiB, 4, 8 * MiB)
    r = Reassembler(max_message_bytes=MiB)
    assert (r.max_sender_bytes, r.max_sender_streams, r.max_pending_bytes) == (2 * MiB, 4, 8 * MiB)
    # a legitimate sender with two messages of the largest size in flight at once loses neither
    a, b = os.urandom(MiB), os.urandom(MiB)
    ca, cb = split(a, 64 * 1024), split(b, 64 * 1024)
    outs = [r.feed(LEGIT, c) for pair in zip(ca, cb) for c in pair]
    assert [o for o in outs if o is not None] == [a, b] and not r.dropped


def test_hostile_flood_of_streams_on_one_topic_does_not_touch_a_legit_sender() -> None:
    r = Reassembler(max_message_bytes=MiB)
    frame = os.urandom(900_000)
    legit = split(frame, 64 * 1024)
    got = []
    for k in range(2000):  # 2,000 streams of 60 KB: 120 MB offered, 2 MiB allowed
        r.feed(HOSTILE, junk_chunk(60_000, size=MiB, n=20))
        check_bounded(r, HOSTILE, LEGIT)
        assert len(streams_of(r, HOSTILE)) <= r.max_sender_streams
        if k % 100 == 0 and legit:
            out = r.feed(LEGIT, legit.pop(0))
            if out is not None:
                got.append(out)
    while legit:
        out = r.feed(LEGIT, legit.pop(0))
        if out is not None:
            got.append(out)
    assert got == [frame]
    assert r.dropped["sender_streams"] == 2000 - r.max_sender_streams
    assert r.dropped["global_bytes"] == 0 and r.counters["messages"] == 1


def test_per_sender_bytes_drop_that_senders_oldest_stream_first() -> None:
    r = Reassembler(max_message_bytes=MiB, max_sender_streams=10)
    ids = [f"{k:016x}" for k in range(4)]
    for msg_id in ids:  # four streams of 700 KB each would be 2.8 MB > 2 MiB
        r.feed(HOSTILE, junk_chunk(700_000, size=MiB, n=2, msg_id=msg_id))
        check_bounded(r, HOSTILE)
    assert r.dropped["sender_bytes"] == 2 and streams_of(r, HOSTILE) == ids[2:]
    # the dropped stream's later chunks are ignored: it can never complete now
    r.feed(HOSTILE, junk_chunk(300_000, size=MiB, n=2, i=1, msg_id=ids[0]))
    assert r.counters["dead_chunks"] == 1 and streams_of(r, HOSTILE) == ids[2:]


def test_global_cap_drops_the_oldest_stream_of_anyone() -> None:
    r = Reassembler(max_message_bytes=MiB, max_pending_bytes=3 * MiB)
    topics = [f"fedcmd/t/client/{k}/update" for k in range(10)]  # a broker without ACL: any topic
    for k, topic in enumerate(topics):
        r.feed(topic, junk_chunk(900_000, size=MiB, n=2, msg_id=f"{k:016x}"))
        check_bounded(r, *topics)
    held = sorted(key[0] for key in r._streams)
    assert held == sorted(topics[-3:]) and r.dropped["global_bytes"] == 7
    assert r.pending_bytes <= 3 * MiB


def test_a_message_larger_than_the_per_sender_limit_is_refused() -> None:
    r = Reassembler(max_message_bytes=MiB, max_sender_bytes=100_000)
    r.feed(HOSTILE, junk_chunk(60_000, size=MiB, n=4))
    with pytest.raises(ChunkError) as e:
        r.feed(HOSTILE, junk_chunk(60_000, size=MiB, n=4, i=1, msg_id=next(iter(r._streams))[1]))
    assert e.value.kind == "pending_limit" and r.pending == 0 and r.pending_bytes == 0


def test_one_chunk_messages_take_no_stream_slot() -> None:
    r = Reassembler(max_message_bytes=MiB, max_sender_streams=1)
    frame = os.urandom(300_000)
    chunks = split(frame, 100_000)
    assert r.feed(LEGIT, chunks[0]) is None
    for k in range(50):  # presences and the like while an update is on its way
        assert r.feed(LEGIT, split(b"p%d" % k, 4096)[0]) == b"p%d" % k
    outs = [r.feed(LEGIT, c) for c in chunks[1:]]
    assert outs[-1] == frame and not r.dropped


def test_tiny_chunks_are_charged_for_their_overhead() -> None:
    """A sender of 1-byte chunks may not pin ~100x the limit in Python objects."""
    limit = MiB
    r = Reassembler(max_message_bytes=10 * MiB, max_sender_bytes=limit, max_sender_streams=1)
    msg_id = secrets.token_hex(8)
    chunks = [junk_chunk(1, size=10 * MiB, n=10 * MiB, i=i, msg_id=msg_id) for i in range(40_000)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for c in chunks:
        try:
            r.feed(HOSTILE, c)
        except ChunkError:
            pass
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert r.pending_bytes <= limit
    assert grown < 2 * limit, grown  # 40,000 held parts without the charge would be ~6 MB


def test_expired_streams_are_counted_as_drops() -> None:
    r = Reassembler(timeout_s=5.0, max_message_bytes=MiB)
    seen: list[tuple[str, str]] = []
    r.on_drop = lambda kind, topic, text: seen.append((kind, topic))
    r.feed(HOSTILE, junk_chunk(10, size=100, n=2), now=0.0)
    (reason,) = r.expire(now=6.0)
    assert "incomplete after 6.0 s" in reason and seen == [("expired", HOSTILE)]
    assert r.dropped["expired"] == 1 and r.counters["expired"] == 1 and r.pending_bytes == 0


# ------------------------------------------------------------------------------------ real broker
FLOOD = """
import json, os, secrets, sys, time
import paho.mqtt.client as mqtt
port, topic, count, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flooder", protocol=mqtt.MQTTv5)
c.max_queued_messages_set(0); c.max_inflight_messages_set(64)
c.connect("127.0.0.1", port); c.loop_start()
data = os.urandom(size)
for k in range(count):
    meta = {"id": secrets.token_hex(8), "i": 0, "n": 40, "size": 40 * size, "sha256": secrets.token_hex(32)}
    raw = json.dumps(meta, separators=(",", ":")).encode()
    info = c.publish(topic, b"FCH1" + len(raw).to_bytes(2, "big") + raw + data, qos=1)
    if k % 64 == 63:
        info.wait_for_publish(30)
info.wait_for_publish(30)
c.disconnect(); c.loop_stop()
print("sent", count)
"""


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.timeout(180)
def test_a_flood_of_junk_chunks_leaves_the_receiver_bounded(
    mosquitto_broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """2,500 junk 200 KB chunks (500 MB), each opening a new message, from a raw anonymous client at a
    receiver with the default limits, while a legitimate sender's 3 MB message gets through intact. Before
    the per-sender limits all 500 MB stayed pinned for the 60 s reassembly timeout (global cap 1 GiB)."""
    receiver = MqttTransport(mosquitto_broker.url, "coordinator")
    agent = MqttTransport(mosquitto_broker.url, "agent-1")
    caps = receiver._reasm.max_pending_bytes
    inbox: list[tuple[str, bytes]] = []
    receiver.subscribe("fedcmd/t/client/+/update", lambda t, p: inbox.append((t, p)))
    base = _rss()
    peak = {"rss": base, "pending": 0, "sender": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], _rss())
            peak["pending"] = max(peak["pending"], receiver._reasm.pending_bytes)
            peak["sender"] = max(peak["sender"], receiver._reasm.sender_bytes(HOSTILE))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    count = 2500
    caplog.set_level(logging.WARNING, logger="fedcmd.mqtt")
    try:
        t0 = time.monotonic()
        flood = subprocess.Popen(
            [sys.executable, "-c", FLOOD, str(mosquitto_broker.port), HOSTILE, str(count), str(200_000)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        frame = os.urandom(3_000_000)
        while receiver.stats["chunks_in"] < 200:  # the flood is under way
            receiver.run_until(lambda: False, 0.05)
        agent.publish(LEGIT, frame)
        assert receiver.run_until(lambda: bool(inbox), 60)
        print(f"legit message in after {time.monotonic() - t0:.1f} s")
        out, _ = flood.communicate(timeout=120)
        print(f"flood sent after {time.monotonic() - t0:.1f} s")
        assert flood.returncode == 0, out
        assert receiver.run_until(lambda: receiver.stats["chunks_in"] >= count + agent.stats["chunks_out"], 60)
    finally:
        stop.set()
        sampler.join()
        receiver.close()
        agent.close()
    assert inbox == [(LEGIT, frame)]
    assert peak["pending"] <= caps and peak["sender"] <= receiver._reasm.max_sender_bytes
    assert receiver.dropped["sender_streams"] >= count - 4 and receiver.rejected["sender_streams"] >= count - 4
    grown = peak["rss"] - base
    print(f"RSS {base / MiB:.0f} MiB -> peak {peak['rss'] / MiB:.0f} MiB (+{grown / MiB:.0f}); "
          f"pending peak {peak['pending'] / MiB:.1f} MiB; dropped {dict(receiver.dropped)}")
    # the sender's own limit binds here (4 streams of one 200 KB chunk): far below the global cap
    assert grown < 100 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"
    # one warning for the flood, not one per chunk
    drops = [r for r in caplog.records if "dropped incomplete message" in r.getMessage()]
    assert len(drops) == 1 and HOSTILE in drops[0].getMessage()


FLOOD_WHOLE = """
import os, secrets, sys
import paho.mqtt.client as mqtt
from protocols.chunking import split
port, topic, count, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flooder", protocol=mqtt.MQTTv5)
c.max_queued_messages_set(0); c.max_inflight_messages_set(64)
c.connect("127.0.0.1", port); c.loop_start()
for k in range(count):
    (chunk,) = split(os.urandom(size), size + 1024)
    info = c.publish(topic, chunk, qos=1)
    if k % 64 == 63:
        info.wait_for_publish(30)
info.wait_for_publish(30)
c.disconnect(); c.loop_stop()
"""


@pytest.mark.timeout(180)
def test_complete_junk_queued_while_the_receiver_is_busy_is_bounded(mosquitto_broker: Broker) -> None:
    """1,000 complete 200 KB junk messages (200 MB) arrive while the application is busy elsewhere (not
    in run_until): the queue of messages waiting for it keeps at most the sender's share (16 MiB with
    8 MiB messages), the oldest dropped; the legitimate sender's message is still there afterwards."""
    receiver = MqttTransport(mosquitto_broker.url, "coordinator", max_message_bytes=8 * MiB)
    agent = MqttTransport(mosquitto_broker.url, "agent-1")
    inbox: list[tuple[str, bytes]] = []
    try:
        receiver.subscribe("fedcmd/t/client/+/update", lambda t, p: inbox.append((t, p)))
        frame = os.urandom(3_000_000)
        agent.publish(LEGIT, frame)
        base = _rss()
        count = 1000
        flood = subprocess.run(
            [sys.executable, "-c", FLOOD_WHOLE, str(mosquitto_broker.port), HOSTILE, str(count), str(200_000)],
            capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
        )
        assert flood.returncode == 0, flood.stderr
        end = time.monotonic() + 60
        while receiver.stats["messages_in"] < count + 1 and time.monotonic() < end:
            time.sleep(0.05)  # busy: nothing is handled meanwhile
        grown = _rss() - base
        assert receiver.stats["messages_in"] == count + 1
        assert receiver.run_until(lambda: False, 1.0) is False
    finally:
        receiver.close()
        agent.close()
    hostile = [p for t, p in inbox if t == HOSTILE]
    assert inbox[0] == (LEGIT, frame)
    assert 0 < len(hostile) * 200_000 <= 16 * MiB
    assert receiver.dropped["inbox_sender"] == count - len(hostile) == receiver.rejected["inbox_sender"]
    print(f"queued junk kept: {len(hostile)}, dropped {receiver.dropped['inbox_sender']}, RSS +{grown / MiB:.0f} MiB")
    assert grown < 100 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"
