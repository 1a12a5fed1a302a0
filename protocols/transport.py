"""The transport interface the coordinator and agents use, and nothing else: so one round loop serves
the in-process simulation and a real MQTT fleet."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

Handler = Callable[[str, bytes], None]


class TransportError(RuntimeError):
    """The transport could not do what was asked (broker unreachable, refused, closed); the text says why."""


class Transport(ABC):
    #: completed reconnections to the broker since the transport was made (never, in process): a coordinator
    #: that sees it change re-sends the open round's tasks, which the broker may have lost while it was down.
    reconnects: int = 0

    @abstractmethod
    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Send ``payload`` to every subscriber of ``topic`` (at least once)."""

    @abstractmethod
    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        """Call ``handler(topic, payload)`` for each message matching ``topic_filter``."""

    @abstractmethod
    def run_until(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        """Deliver messages until ``done()`` is true or ``timeout`` seconds pass; returns ``done()``."""

    def close(self) -> None:
        """Release connections."""
