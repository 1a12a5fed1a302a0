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
from dataclasses import dataclass, field
from typing import NamedTuple

MAGIC = b"FCH1"
DEFAULT_LIMIT = 256 * 1024
MIN_LIMIT = 256  # the envelope is at most ~170 bytes
MAX_ENVELOPE_JSON = 1024
_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_KEYS = frozenset({"id", "i", "n", "size", "sha256"})


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
    received: int = 0


class Reassembler:
    """Collects chunks per ``(source topic, id)`` and returns each frame once, complete and verified.

    Thread-safe. Duplicates (QoS 1 redelivery) of a pending chunk or of a recently completed message are
    dropped and counted, not returned twice. ``counters`` keys: chunks, messages, duplicates, rejected,
    expired, and ``rejected:<kind>`` per :class:`ChunkError` kind.
    """

    def __init__(
        self,
        timeout_s: float = 60.0,
        max_message_bytes: int = 512 * 1024 * 1024,
        max_pending_bytes: int | None = None,
        remember: int = 4096,
    ) -> None:
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        # Bytes held by incomplete streams, over all senders: bounds what junk streams can pin in memory.
        self.max_pending_bytes = max_pending_bytes if max_pending_bytes is not None else 2 * max_message_bytes
        self.counters: Counter[str] = Counter()
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._done: OrderedDict[tuple[str, str], None] = OrderedDict()
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

    def _reject(self, err: ChunkError) -> ChunkError:
        self.counters["rejected"] += 1
        self.counters[f"rejected:{err.kind}"] += 1
        return err

    def _drop(self, key: tuple[str, str]) -> None:
        stream = self._streams.pop(key, None)
        if stream is not None:
            self._pending_bytes -= stream.received

    def feed(self, source_topic: str, chunk: bytes, *, now: float | None = None, dedupe: bool = True) -> bytes | None:
        """Take one chunk; the whole frame once its last chunk arrived, else None.

        ``dedupe=False`` lets a completed message through again (a retained message replayed to a new
        subscription). Raises :class:`ChunkError` for a bad envelope, a chunk that disagrees with the
        others of its message (that stream is dropped), an oversize message, or a failed integrity check.
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
                stream = self._streams[key] = _Stream(n=n, size=size, sha256=sha, started=now)
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
            if self._pending_bytes + len(data) > self.max_pending_bytes:
                self._drop(key)
                raise self._reject(
                    ChunkError("pending_limit", f"incomplete messages would hold over {self.max_pending_bytes} bytes")
                )
            stream.parts[i] = bytes(data)
            stream.received += len(data)
            self._pending_bytes += len(data)
            if len(stream.parts) < n:
                return None
            self._drop(key)
            frame = b"".join(stream.parts[j] for j in range(n))
            if len(frame) != size:
                raise self._reject(ChunkError("integrity", f"message {key[1]}: {len(frame)} bytes, declared {size}"))
            if hashlib.sha256(frame).hexdigest() != sha:
                raise self._reject(ChunkError("integrity", f"message {key[1]} on {source_topic}: sha256 mismatch"))
            self._done[key] = None
            while len(self._done) > self._remember:
                self._done.popitem(last=False)
            self.counters["messages"] += 1
            return frame

    def expire(self, now: float | None = None) -> list[str]:
        """Drop incomplete streams older than ``timeout_s``; returns one reason per stream dropped."""
        now = time.monotonic() if now is None else now
        reasons = []
        with self._lock:
            for key, stream in list(self._streams.items()):
                if now - stream.started > self.timeout_s:
                    self._drop(key)
                    self.counters["expired"] += 1
                    reasons.append(
                        f"message {key[1]} on {key[0]} incomplete after {now - stream.started:.1f} s: "
                        f"{len(stream.parts)} of {stream.n} chunks, {stream.received} of {stream.size} bytes"
                    )
        return reasons
