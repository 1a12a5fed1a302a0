"""The coordinator: the round loop. Samples clients, sends tasks, collects updates, lets the server
strategy aggregate, and reports per-round metrics. It talks only through a Transport."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcmd_core.strategies import ServerStrategy, Task, Update
from protocols.codec import DecodeError, Header, decode, encode
from protocols.topics import task_topic, updates_filter
from protocols.transport import Transport

log = logging.getLogger("fedcmd.cloud")


@dataclass
class RoundSettings:
    num_clients: int
    global_epoch: int
    join_ratio: float
    seed: int
    local_epoch: int
    straggler_ratio: float = 0.0
    straggler_min_local_epoch: int = 1
    deadline: float | None = None  # seconds to wait for a round's updates (None: forever)
    test_gap: int = 0  # evaluate every client every test_gap rounds (0: only at the end)


@dataclass
class RoundRecord:
    round: int
    phase: str
    clients: list[int]
    metrics: dict[str, float]
    bytes_down: int
    bytes_up: int
    seconds: float
    facts: dict[str, Any] = field(default_factory=dict)


def pooled(updates: Sequence[Update]) -> dict[str, float]:
    """Pooled accuracy and mean loss over the updates' evaluation counts (the paper's metric)."""
    totals: Counter[str] = Counter()
    for u in updates:
        totals.update(u.metrics)
    out: dict[str, float] = {}
    for key in sorted(totals):
        if not key.endswith("_count"):
            continue
        prefix = key[: -len("_count")]
        n = totals[key]
        if n:
            out[f"{prefix}_acc"] = 100.0 * totals[f"{prefix}_correct"] / n
            out[f"{prefix}_loss"] = totals[f"{prefix}_loss"] / n
    return out


class Coordinator:
    def __init__(self, transport: Transport, strategy: ServerStrategy, fleet: str, settings: RoundSettings) -> None:
        self.transport = transport
        self.strategy = strategy
        self.fleet = fleet
        self.s = settings
        self.rng = np.random.default_rng(settings.seed)
        self.stragglers = self._pick_stragglers()
        self.inbox: dict[int, Update] = {}
        self.expected: set[int] = set()
        self.current_round = -1
        self.bytes_up = 0
        self.rejected: Counter[str] = Counter()
        transport.subscribe(updates_filter(fleet), self._on_update)

    # ------------------------------------------------------------------------------------- sampling
    def _pick_stragglers(self) -> set[int]:
        n = int(self.s.num_clients * self.s.straggler_ratio)
        rng = np.random.default_rng(self.s.seed + 1)
        return set(rng.choice(self.s.num_clients, n, replace=False).tolist()) if n else set()

    def sample(self) -> list[int]:
        k = max(1, int(self.s.num_clients * self.s.join_ratio))
        return self.rng.choice(self.s.num_clients, k, replace=False).tolist()

    def _local_epoch(self, cid: int) -> int:
        if cid in self.stragglers and self.s.local_epoch > self.s.straggler_min_local_epoch:
            return int(self.rng.integers(self.s.straggler_min_local_epoch, self.s.local_epoch))
        return self.s.local_epoch

    # ------------------------------------------------------------------------------------- messages
    def _send(self, rnd: int, cid: int, task: Task) -> int:
        header = Header(type="task", fleet=self.fleet, round=rnd, client=cid, kind=task.kind, payload=task.config)
        frame = encode(header, task.arrays)
        self.transport.publish(task_topic(self.fleet, cid), frame)
        return len(frame)

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        log.warning("rejected update: %s (%s)", detail, reason)

    def _on_update(self, topic: str, payload: bytes) -> None:
        try:
            header, arrays = decode(payload)
        except DecodeError as e:
            self._reject("malformed", str(e))
            return
        if header.type != "update" or header.fleet != self.fleet:
            self._reject("wrong_fleet", f"{header.type} for fleet {header.fleet!r}")
            return
        if header.round != self.current_round:
            self._reject("wrong_round", f"client {header.client} round {header.round} != {self.current_round}")
            return
        if header.client not in self.expected:
            self._reject("unexpected_client", f"client {header.client} was not tasked in round {header.round}")
            return
        if header.client in self.inbox:
            self._reject("duplicate", f"client {header.client} round {header.round}")
            return
        bad = [k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
        if bad:
            self._reject("non_finite", f"client {header.client}: {bad[:3]}")
            return
        self.bytes_up += len(payload)
        metrics = {k: float(v) for k, v in header.payload.get("metrics", {}).items()}
        info = header.payload.get("info", {})
        self.inbox[header.client] = Update(header.round, arrays, header.num_samples, metrics, info)

    def _collect(self, rnd: int, cids: Sequence[int], kind: str, sequential: bool) -> tuple[list[int], int]:
        """Send ``kind`` tasks to ``cids`` and wait for their updates; returns (answered, bytes down)."""
        self.current_round, self.inbox, self.expected = rnd, {}, set(cids)
        down = 0
        answered: list[int] = []
        groups = [[c] for c in cids] if sequential else [list(cids)]
        for group in groups:
            for cid in group:
                task = self.strategy.task_for(rnd, cid, "fit" if kind == "fit" else "evaluate")
                if kind == "fit":
                    task.config = {**task.config, "local_epoch": self._local_epoch(cid)}
                down += self._send(rnd, cid, task)
            self.transport.run_until(lambda g=group: all(c in self.inbox for c in g), self.s.deadline)
            for cid in group:
                if cid in self.inbox:
                    answered.append(cid)
                    if kind == "fit":
                        self.strategy.on_update(rnd, cid, self.inbox[cid])
                else:
                    log.warning("round %d: client %d did not answer before the deadline", rnd, cid)
        return answered, down

    # ------------------------------------------------------------------------------------- the loop
    def run_round(self, rnd: int) -> RoundRecord:
        start = time.perf_counter()
        cids = self.sample()
        self.strategy.begin_round(rnd, cids)
        self.bytes_up = 0
        answered, down = self._collect(rnd, cids, "fit", self.strategy.sequential(rnd))
        updates = [self.inbox[c] for c in answered]
        facts = self.strategy.end_round(rnd, answered)
        metrics = pooled(updates)
        up = self.bytes_up
        if self.s.test_gap and (rnd + 1) % self.s.test_gap == 0 and rnd + 1 < self.s.global_epoch:
            metrics.update({f"all_{k}": v for k, v in self.evaluate_all(rnd).items()})
        seconds = time.perf_counter() - start
        return RoundRecord(rnd, self.strategy.phase(rnd), cids, metrics, down, up, seconds, facts)

    def evaluate_all(self, rnd: int) -> dict[str, float]:
        """Personalized accuracy of every client (its body from the cloud + its own local layers)."""
        everyone = list(range(self.s.num_clients))
        answered, _ = self._collect(rnd, everyone, "evaluate", sequential=False)
        return pooled([self.inbox[c] for c in answered])

    def run(self, on_round: Callable[[RoundRecord], None] | None = None) -> list[RoundRecord]:
        records = []
        for rnd in range(self.s.global_epoch):
            record = self.run_round(rnd)
            records.append(record)
            if on_round is not None:
                on_round(record)
        return records
