"""The coordinator's one event stream. The round loop emits plain records (round started, update accepted or
rejected, round closed, device presence, run started/finished) to an ``EventBus``; the run-folder writer, the
live dashboard, Prometheus and TensorBoard all subscribe to the same bus, so they can never disagree.

Sinks run synchronously on the round loop's thread and must be cheap; a sink that raises is logged once and
dropped, so watching a run can never break it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("fedcmd.monitor")


@dataclass(frozen=True)
class RunStarted:
    fleet: str
    algo: str
    num_clients: int
    global_epoch: int
    join_ratio: float
    min_clients: int
    deadline: float | None
    next_round: int  # 0, or where a resumed run goes on
    info: dict[str, Any] = field(default_factory=dict)  # dataset, model, seed, hp: what the page names
    history: tuple[Any, ...] = ()  # the RoundRecords a resumed run restored from its checkpoint


@dataclass(frozen=True)
class RoundStarted:
    round: int  # 0-based, as RoundRecord
    phase: str
    sampled: tuple[int, ...]
    deadline: float | None  # seconds the round waits (None: until every device answered)
    min_clients: int
    at: float  # time.time() when it started: the page's deadline countdown


@dataclass(frozen=True)
class UpdateAccepted:
    round: int
    client: int
    bytes: int
    num_samples: int
    kind: str = "fit"  # fit (a training round) or evaluate (the evaluation of every device)


@dataclass(frozen=True)
class UpdateRejected:
    round: int
    client: int | None  # None where the message named no device of this fleet
    reason: str


@dataclass(frozen=True)
class Presence:
    client: int
    state: str  # online | offline | unhealthy | incompatible
    profile: str | None
    reason: str | None
    at: float


@dataclass(frozen=True)
class RoundClosed:
    record: Any  # cloud.service.coordinator.RoundRecord (typed loosely: this module imports nothing of ours)
    strategy: dict[str, Any]  # the strategy's view after this round: chosen layer, votes, similarity
    rejected: dict[str, int]  # reject counters so far, by reason
    at: float


@dataclass(frozen=True)
class RunFinished:
    final: dict[str, float]  # every client's personalized evaluation at the end
    strategy: dict[str, Any]  # the strategy's summary()
    rejected: dict[str, int]
    clipped: int
    seconds: float


Event = RunStarted | RoundStarted | UpdateAccepted | UpdateRejected | Presence | RoundClosed | RunFinished
Sink = Callable[[Any], None]


class EventBus:
    """Fan-out of the coordinator's events to its subscribers, in subscription order. A ``critical`` sink
    (the run-folder writer: losing its rows would lose results) raises; any other is dropped when it fails."""

    def __init__(self) -> None:
        self._sinks: list[Sink] = []
        self._critical: set[int] = set()

    def subscribe(self, sink: Sink, critical: bool = False) -> Sink:
        self._sinks.append(sink)
        if critical:
            self._critical.add(id(sink))
        return sink

    def unsubscribe(self, sink: Sink) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)

    def __bool__(self) -> bool:
        return bool(self._sinks)

    def wants_strategy_view(self) -> bool:
        """Whether a subscriber shows the strategy's vote and similarity (``wants_strategy_view = True``)."""
        return any(getattr(s, "wants_strategy_view", False) for s in self._sinks)

    def emit(self, event: Any) -> None:
        for sink in list(self._sinks):
            if id(sink) in self._critical:
                sink(event)
                continue
            try:
                sink(event)
            except Exception as e:  # a broken viewer must not stop the federation
                log.warning("event sink %r failed on %s (%s: %s); it is unsubscribed",
                            getattr(sink, "__qualname__", sink), type(event).__name__, type(e).__name__, e)
                self.unsubscribe(sink)
