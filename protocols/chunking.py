"""Chunking: a frame of any size crosses a broker with a packet limit as enveloped chunks.

Chunk layout (all integers big-endian)::

    b"FCH1" | u16 L | L bytes of UTF-8 JSON {"id","i","n","size","sha256"} | data

``id`` is 16 lowercase hex digits, fresh per message; chunk ``i`` (0-based) of ``n`` carries the bytes
that follow chunk ``i-1``'s; ``size`` and ``sha256`` (lowercase hex) describe the whole frame. A frame
that fits is still sent as one enveloped chunk, so a receiver has one path. See ``protocols/README.md``.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

MAGIC = b"FCH1"
DEFAULT_LIMIT = 256 * 1024
MIN_LIMIT = 256  # the envelope is at most ~170 bytes
MAX_ENVELOPE_JSON = 1024
_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_KEYS = frozenset({"id", "i", "n", "size", "sha256"})
# Receiver limits (see Reassembler and protocols/README.md §6).
DEFAULT_MAX_MESSAGE = 128 * 1024 * 1024  # a reassembled message; ResNet-18 in float32 is 45 MB
DEFAULT_SENDER_STREAMS = 4  # incomplete messages per sender
DEFAULT_GLOBAL_PENDING = 1024 * 1024 * 1024  # incomplete messages of all senders together, at most
# What a held chunk and a stream cost beside their data (Python objects, dict slots), counted against the
# limits: else a sender of one-byte chunks would pin ~100x the bytes the limits allow.
_PART_COST = 160
_STREAM_COST = 512


class ChunkError(ValueError):
    """A chunk that cannot be accepted. ``kind`` is a short counter key, the text says why."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


def _envelope(meta: dict[str, object]) -> bytes:
    raw = json.dumps(meta, separators=(",", ":")).encode()
    return MAGIC + len(raw).to_bytes(2, "big") + raw


def split(frame: bytes, limit: int = DEFAULT_LIMIT, *, msg_id: str | None = None) -> list[bytes]:
    """Cut ``frame`` into enveloped chunks of at most ``limit`` bytes each (envelope included)."""
    if limit < MIN_LIMIT:
        raise ValueError(f"chunk limit {limit} is below the minimum of {MIN_LIMIT} bytes")
    msg_id = msg_id or secrets.token_hex(8)
    if not _ID_RE.match(msg_id):
        raise ValueError(f"message id {msg_id!r} is not 16 lowercase hex digits")
    size = len(frame)
    base = {"id": msg_id, "i": 0, "n": 1, "size": size, "sha256": hashlib.sha256(frame).hexdigest()}

    # The envelope grows with the digits of i and n: find n where n chunks of (limit - largest
    # envelope) bytes hold the frame. n only grows, so this settles in a few steps.
    n = 1
    while True:
        overhead = len(_envelope({**base, "i": n - 1, "n": n}))
        per_chunk = limit - overhead
        need = max(1, -(-size // per_chunk))
        if need <= n:
            break
        n = need
    view = memoryview(frame)
    # Spread evenly (the first size % n chunks carry one byte more): no tiny or empty last chunk.
    per, extra = divmod(size, n)
    chunks, start = [], 0
    for i in range(n):
        end = start + per + (1 if i < extra else 0)
        chunks.append(_envelope({**base, "i": i, "n": n}) + bytes(view[start:end]))
        start = end
    return chunks


class ChunkHeader(NamedTuple):
    id: str
    i: int
    n: int
    size: int
    sha256: str


def parse_chunk(chunk: bytes, max_message_bytes: int | None = None) -> tuple[ChunkHeader, bytes]:
    """Check one chunk's envelope; returns ``(meta, data)`` or raises :class:`ChunkError`."""
    if len(chunk) < 6 or chunk[:4] != MAGIC:
        raise ChunkError("envelope", f"not a fedcmd chunk (no {MAGIC!r} magic; {len(chunk)} bytes)")
    length = int.from_bytes(chunk[4:6], "big")
    if length > MAX_ENVELOPE_JSON or 6 + length > len(chunk):
        raise ChunkError("envelope", f"envelope header length {length} is invalid for a {len(chunk)}-byte chunk")
    try:
        meta = json.loads(chunk[6 : 6 + length])
    except (ValueError, RecursionError):
        raise ChunkError("envelope", "envelope header is not valid JSON") from None
    if not isinstance(meta, dict) or meta.keys() != _KEYS:
        raise ChunkError("envelope", f"envelope header must be an object with exactly the keys {sorted(_KEYS)}")
    for key in ("i", "n", "size"):
        if isinstance(meta[key], bool) or not isinstance(meta[key], int):
            raise ChunkError("envelope", f"envelope field {key!r} is not an integer")
    if not isinstance(meta["id"], str) or not _ID_RE.match(meta["id"]):
        raise ChunkError("envelope", "envelope id is not 16 lowercase hex digits")
    if not isinstance(meta["sha256"], str) or not _SHA_RE.match(meta["sha256"]):
        raise ChunkError("envelope", "envelope sha256 is not 64 lowercase hex digits")
    i, n, size = meta["i"], meta["n"], meta["size"]
    if size < 0 or n < 1 or not 0 <= i < n or n > max(1, size):
        raise ChunkError("envelope", f"inconsistent envelope: chunk {i} of {n} for {size} bytes")
    if max_message_bytes is not None and size > max_message_bytes:
        raise ChunkError("oversize", f"message of {size} bytes exceeds the limit of {max_message_bytes}")
    data = chunk[6 + length :]
    if len(data) > size:
        raise ChunkError("envelope", f"chunk {i} carries {len(data)} bytes of a {size}-byte message")
    return ChunkHeader(meta["id"], i, n, size, meta["sha256"]), data


@dataclass
class _Stream:
    n: int
    size: int
    sha256: str
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)
    received: int = 0  # data bytes
    held: int = _STREAM_COST  # what the limits count: data plus per-chunk and per-stream overhead


@dataclass
class _Sender:
    """What one source topic holds: its incomplete streams' ids, oldest first, and their bytes."""

    ids: dict[str, None] = field(default_factory=dict)
    bytes: int = 0


#: Why a pending stream was dropped (keys of :attr:`Reassembler.dropped`): to make room, or expired.
DropKind = Literal["sender_streams", "sender_bytes", "global_bytes", "expired"]
DropHook = Callable[[str, str, str], None]


def default_limits(max_message_bytes: int) -> tuple[int, int, int]:
    """``(per-sender bytes, per-sender streams, global bytes)`` for a message limit: a sender can always
    have two whole messages in flight (an update and a presence, or a redelivery overlapping the next
    message); the global cap holds eight senders' worth of whole messages but never more than 1 GiB."""
    return 2 * max_message_bytes, DEFAULT_SENDER_STREAMS, min(8 * max_message_bytes, DEFAULT_GLOBAL_PENDING)


class Reassembler:
    """Collects chunks per ``(source topic, id)`` and returns each frame once, complete and verified.

    Thread-safe. Duplicates (QoS 1 redelivery) of a pending chunk or of a recently completed message are
    dropped and counted, not returned twice. ``counters`` keys: chunks, messages, duplicates, rejected,
    expired, ``rejected:<kind>`` per :class:`ChunkError` kind, ``dropped:<kind>`` per stream dropped for room
    and ``dead_chunks`` (later chunks of a dropped or expired stream, ignored: it can never complete).

    Memory: the source topic is the sender (MQTT gives no other identity; each device has its own topics).
    A sender holds at most ``max_sender_streams`` incomplete streams and ``max_sender_bytes`` bytes, all
    senders together ``max_pending_bytes`` (each held chunk counts its data plus a fixed overhead). A chunk
    that would pass a limit first drops the oldest pending streams (the sender's own for its limits,
    anyone's for the global one) until it fits. ``dropped`` counts dropped streams by :data:`DropKind`
    (expired ones too) and ``on_drop(kind, topic, text)``, called under the lock, hears of each.
    """

    def __init__(
        self,
        timeout_s: float = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        max_pending_bytes: int | None = None,
        remember: int = 4096,
        *,
        max_sender_bytes: int | None = None,
        max_sender_streams: int | None = None,
        on_drop: DropHook | None = None,
    ) -> None:
        sender_bytes, sender_streams, global_bytes = default_limits(max_message_bytes)
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self.max_sender_bytes = sender_bytes if max_sender_bytes is None else max_sender_bytes
        self.max_sender_streams = sender_streams if max_sender_streams is None else max_sender_streams
        self.max_pending_bytes = global_bytes if max_pending_bytes is None else max_pending_bytes
        if min(self.max_sender_bytes, self.max_sender_streams, self.max_pending_bytes) < 1:
            raise ValueError("reassembly limits must be positive")
        self.counters: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.on_drop = on_drop
        self._streams: dict[tuple[str, str], _Stream] = {}  # insertion order = oldest first
        self._senders: dict[str, _Sender] = {}  # only senders with pending streams: bounded by the streams
        self._done: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._dead: OrderedDict[tuple[str, str], None] = OrderedDict()  # streams dropped for room
        self._remember = remember
        self._pending_bytes = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Incomplete streams held."""
        return len(self._streams)

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def sender_bytes(self, source_topic: str) -> int:
        """Bytes the incomplete streams of one sender hold."""
        sender = self._senders.get(source_topic)
        return sender.bytes if sender else 0

    def _reject(self, err: ChunkError) -> ChunkError:
        self.counters["rejected"] += 1
        self.counters[f"rejected:{err.kind}"] += 1
        return err

    def _drop(self, key: tuple[str, str]) -> _Stream | None:
        stream = self._streams.pop(key, None)
        if stream is not None:
            self._pending_bytes -= stream.held
            sender = self._senders[key[0]]
            sender.bytes -= stream.held
            del sender.ids[key[1]]
            if not sender.ids:
                del self._senders[key[0]]
        return stream

    @staticmethod
    def _remember_key(memo: OrderedDict[tuple[str, str], None], key: tuple[str, str], limit: int) -> None:
        memo[key] = None
        memo.move_to_end(key)
        while len(memo) > limit:
            memo.popitem(last=False)

    def _evict(self, key: tuple[str, str], kind: DropKind, now: float | None = None) -> str | None:
        """Drop a pending stream for room or age; its later chunks are ignored (it cannot complete now).
        Returns the reason, or None if there was no such stream."""
        stream = self._drop(key)
        if stream is None:
            return None
        self.dropped[kind] += 1
        self.counters[f"dropped:{kind}"] += 1
        self._remember_key(self._dead, key, self._remember)
        held = f"{len(stream.parts)} of {stream.n} chunks, {stream.received} of {stream.size} bytes"
        if kind == "expired":
            age = (now if now is not None else time.monotonic()) - stream.started
            reason = f"message {key[1]} on {key[0]} incomplete after {age:.1f} s: {held}"
        else:
            limit = {
                "sender_streams": f"{self.max_sender_streams} incomplete messages per sender",
                "sender_bytes": f"{self.max_sender_bytes} pending bytes per sender",
                "global_bytes": f"{self.max_pending_bytes} pending bytes in all",
            }[kind]
            reason = f"dropped incomplete message {key[1]} on {key[0]} ({held}) to stay within {limit}"
        if self.on_drop is not None:
            self.on_drop(kind, key[0], reason)
        return reason

    def _make_room(self, key: tuple[str, str], need: int) -> None:
        """Drop the oldest other streams until ``need`` more bytes for stream ``key`` fit every limit; raises
        ``pending_limit`` (dropping ``key``) when that stream alone would pass one (limits set below twice
        the message limit)."""
        topic = key[0]
        sender = self._senders[topic]
        while sender.bytes + need > self.max_sender_bytes:
            oldest = next((i for i in sender.ids if i != key[1]), None)
            if oldest is None:
                self._drop(key)
                self._remember_key(self._dead, key, self._remember)
                raise self._reject(
                    ChunkError("pending_limit", f"message {key[1]} on {topic} alone would hold over "
                               f"{self.max_sender_bytes} pending bytes (the per-sender limit)")
                )
            self._evict((topic, oldest), "sender_bytes")
        while self._pending_bytes + need > self.max_pending_bytes:
            oldest_key = next((k for k in self._streams if k != key), None)
            if oldest_key is None:
                self._drop(key)
                self._remember_key(self._dead, key, self._remember)
                raise self._reject(
                    ChunkError("pending_limit", f"message {key[1]} on {topic} alone would hold over "
                               f"{self.max_pending_bytes} pending bytes (the global limit)")
                )
            self._evict(oldest_key, "global_bytes")

    def feed(self, source_topic: str, chunk: bytes, *, now: float | None = None, dedupe: bool = True) -> bytes | None:
        """Take one chunk; the whole frame once its last chunk arrived, else None.

        ``dedupe=False`` lets a completed message through again (a retained message replayed to a new
        subscription). Raises :class:`ChunkError` for a bad envelope, a chunk that disagrees with the
        others of its message (that stream is dropped), an oversize message, a message that alone would
        pass a pending limit, or a failed integrity check.
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            self.counters["chunks"] += 1
            try:
                meta, data = parse_chunk(chunk, self.max_message_bytes)
            except ChunkError as e:
                raise self._reject(e) from None
            key = (source_topic, meta.id)
            i, n, size, sha = meta.i, meta.n, meta.size, meta.sha256
            if dedupe and key in self._done:
                self.counters["duplicates"] += 1
                return None
            stream = self._streams.get(key)
            if stream is None:
                if key in self._dead:
                    self.counters["dead_chunks"] += 1
                    return None
                if n == 1:  # complete at once: pins nothing, so it takes no stream slot
                    return self._complete(key, {0: data}, size, sha)
                sender = self._senders.get(source_topic)
                while sender is not None and len(sender.ids) >= self.max_sender_streams:
                    self._evict((source_topic, next(iter(sender.ids))), "sender_streams")
                    sender = self._senders.get(source_topic)
                sender = self._senders.setdefault(source_topic, _Sender())
                stream = self._streams[key] = _Stream(n=n, size=size, sha256=sha, started=now)
                sender.ids[meta.id] = None
                sender.bytes += stream.held
                self._pending_bytes += stream.held
            elif (stream.n, stream.size, stream.sha256) != (n, size, sha):
                self._drop(key)
                raise self._reject(
                    ChunkError("mismatch", f"chunk {i} of message {key[1]} on {source_topic} disagrees with its stream")
                )
            if i in stream.parts:
                self.counters["duplicates"] += 1
                return None
            if stream.received + len(data) > size:
                self._drop(key)
                raise self._reject(ChunkError("oversize", f"message {key[1]} sent more than its declared {size} bytes"))
            cost = len(data) + _PART_COST
            self._make_room(key, cost)
            stream.parts[i] = bytes(data)
            stream.received += len(data)
            stream.held += cost
            self._pending_bytes += cost
            self._senders[source_topic].bytes += cost
            if len(stream.parts) < n:
                return None
            self._drop(key)
            return self._complete(key, stream.parts, size, sha)

    def _complete(self, key: tuple[str, str], parts: dict[int, bytes], size: int, sha: str) -> bytes:
        frame = b"".join(parts[j] for j in range(len(parts)))
        if len(frame) != size:
            raise self._reject(ChunkError("integrity", f"message {key[1]}: {len(frame)} bytes, declared {size}"))
        if hashlib.sha256(frame).hexdigest() != sha:
            raise self._reject(ChunkError("integrity", f"message {key[1]} on {key[0]}: sha256 mismatch"))
        self._remember_key(self._done, key, self._remember)
        self.counters["messages"] += 1
        return frame

    def expire(self, now: float | None = None) -> list[str]:
        """Drop incomplete streams older than ``timeout_s``; returns one reason per stream dropped."""
        now = time.monotonic() if now is None else now
        reasons = []
        with self._lock:
            for key, stream in list(self._streams.items()):
                if now - stream.started > self.timeout_s:
                    self.counters["expired"] += 1
                    reasons.append(self._evict(key, "expired", now) or "")
        return reasons
