"""In-process transport: a FIFO of framed messages delivered on the caller's thread.

Delivery happens inside :meth:`run_until`, never inside :meth:`publish`, so handlers that publish
(an agent answering a task) do not recurse, and the order of delivery is deterministic.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

from protocols.topics import matches
from protocols.transport import Handler, Transport


class MemoryTransport(Transport):
    def __init__(self) -> None:
        # (topic, payload, handler): handler is None for normal delivery, or the one new subscriber
        # a retained message is replayed to.
        self._queue: deque[tuple[str, bytes, Handler | None]] = deque()
        self._subs: list[tuple[str, Handler]] = []
        self._retained: dict[str, bytes] = {}
        self.bytes_published = 0
        # Same counters a coordinator reads from MqttTransport; nothing is ever dropped in process.
        self.rejected: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.bytes_published += len(payload)
        if retain:
            self._retained[topic] = payload
        self._queue.append((topic, bytes(payload), None))

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        self._subs.append((topic_filter, handler))
        for topic, payload in self._retained.items():
            if matches(topic_filter, topic):
                self._queue.append((topic, payload, handler))

    def run_until(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        while not done() and self._queue:
            topic, payload, only = self._queue.popleft()
            if only is not None:
                only(topic, payload)
                continue
            for topic_filter, handler in list(self._subs):
                if matches(topic_filter, topic):
                    handler(topic, payload)
        return done()
