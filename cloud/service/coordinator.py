"""The coordinator: the round loop. Samples online clients, sends tasks, collects updates until every
client answered or the deadline passed, lets the server strategy aggregate, checkpoints, and publishes
a retained status. It talks only through a Transport, so one loop serves simulation and deployment."""

from __future__ import annotations

import copy
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud.monitor import events as ev
from cloud.service.validation import Rejected, check_arrays, check_info, check_metrics, check_num_samples
from fedcmd_core.robust import GROUPS, clip_bound, clip_update, update_norms
from fedcmd_core.state_tree import DiskError, load_state_file, save_state_file
from fedcmd_core.strategies import ServerStrategy, Task, Update
from fedcmd_core.strategies.base import StateVersionError
from protocols.codec import DecodeError, Header, decode, encode
from protocols.topics import (
    parse_client_topic,
    parse_presence,
    presence_filter,
    status_topic,
    task_topic,
    updates_filter,
)
from protocols.transport import Transport

log = logging.getLogger("fedcmd.cloud")
# Rejections of an answer that passed the identity checks (this run, round, kind, a tasked device): with
# settle_on_bad_answer the round stops waiting for that device.
ANSWER_FAULTS = frozenset({"bad_count", "bad_info", "bad_tensors", "non_finite", "bad_metrics"})
NORM_WINDOW = 100  # update norms the clipping median is taken over
MAX_STATUS_PROFILES = 16
MAX_SIMILARITY_SHOWN = 48  # devices of the similarity matrix an event carries (the dashboard's heat map)
LOGGED_REJECTS = 5  # per (reason, device) before the log only counts
EVALUATE_GROUP = 256  # devices evaluated at a time by evaluate_all: bounds the tasks held (10,000 bodies: GBs)


def _client_topic(topic: str) -> tuple[str, int, str]:
    try:
        return parse_client_topic(topic)
    except ValueError as e:
        raise Rejected("bad_topic", str(e)) from None


@dataclass
class RoundSettings:
    num_clients: int
    global_epoch: int
    join_ratio: float
    seed: int
    local_epoch: int
    straggler_ratio: float = 0.0
    straggler_min_local_epoch: int = 1
    deadline: float | None = None  # seconds to wait for a round's (or a relay step's) updates; None: forever
    min_clients: int = 1  # fewer answers than this and the round is not aggregated
    test_gap: int = 0  # evaluate every client every test_gap rounds (0: only at the end)
    track_presence: bool = False  # sample only clients whose retained presence says online
    update_codec: str = "none"  # how devices encode their updates: none, fp16, int8
    max_update_bytes: int = 512 * 2**20  # larger updates are rejected before decoding
    # Counts a device reports are bounded: its training-set size where the coordinator knows it (simulation),
    # else this maximum; evaluation counts by the maximum, and correct <= count.
    max_num_samples: int = 10_000_000
    train_sizes: dict[int, int] | None = None
    # Update-norm clipping: an update (trained - sent) longer than clip_factor x the median norm of the
    # round (and of recent rounds) is scaled to the median length; 0 turns clipping off.
    clip_factor: float = 3.0
    # An "offline" presence ends the wait for a device only after this grace: a broker that shuts down
    # normally sends every device's last will, and the devices are back seconds later.
    offline_grace: float = 5.0
    # After a broker outage, the next round waits (at most this long) for the devices that were online
    # before it to announce themselves again, so the outage does not change who can be sampled.
    rejoin_wait: float = 30.0
    # A tasked device whose answer is rejected for its content will send nothing else: stop waiting for it.
    # Only where nobody else can publish on a device's topic (per-device ACLs, `fedcmd deploy acl`; a
    # simulation's private broker): on an open broker a forger could end a real device's round this way.
    settle_on_bad_answer: bool = False


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
    answered: list[int] = field(default_factory=list)


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
    def __init__(
        self,
        transport: Transport,
        strategy: ServerStrategy,
        fleet: str,
        settings: RoundSettings,
        checkpoint: Path | None = None,
        run_info: dict[str, Any] | None = None,
        events: ev.EventBus | None = None,
    ) -> None:
        self.transport = transport
        # what happens, as it happens: the run-folder writer, dashboard and Prometheus all read this one stream
        self.events = events if events is not None else ev.EventBus()
        self.strategy = strategy
        self.fleet = fleet
        self.s = settings
        self.checkpoint = checkpoint
        self.run_info = run_info or {}  # published in the status: what agents need to build their side
        # Tasks carry the run id and updates must echo it: a device's cached answer from another run (or a
        # forged one) never counts. Kept in the checkpoint, so a resumed run is the same run.
        self.run_id = uuid.uuid4().hex[:16]
        self.rng = np.random.default_rng(settings.seed)
        self.stragglers = self._pick_stragglers()
        self.next_round = 0
        self.records: list[RoundRecord] = []
        self.rejected: Counter[str] = Counter()
        self._logged: Counter[tuple[str, int]] = Counter()
        self.clipped = 0
        self.norm_history: dict[str, list[float]] = {}  # recent update norms per group: the clipping median
        self.online: set[int] = set()
        self._population: list[int] | None = None  # population(), cached until `online` changes
        self._population_key: tuple[int, int] = (0, -1)
        self._status_profiles: tuple[list[int], dict[str, int]] | None = None  # for that population
        self.health: dict[int, tuple[str, str]] = {}  # device -> (unhealthy | incompatible, its reason)
        self.offline_since: dict[int, float] = {}  # device -> when its offline presence (or will) arrived
        self._last_population: Sequence[int] = ()
        self._sampled_at_reconnects = transport.reconnects
        self._sent_at_reconnects = transport.reconnects
        self.profiles: dict[int, str] = {}  # device profile each device reported in its presence
        self.inbox: dict[int, Update] = {}
        self.asked: dict[int, Task] = {}  # the open round's task per device: what its answer is checked against
        self.failed: set[int] = set()  # tasked devices whose answer was rejected: nothing else will come
        self._frames: dict[int, bytes] = {}  # the same tasks encoded, re-sent after a broker outage
        self.current_round = -1
        self.bytes_up = 0
        if checkpoint is not None and checkpoint.is_file():
            self._restore(checkpoint)
        transport.subscribe(updates_filter(fleet), self._on_update)
        transport.subscribe(presence_filter(fleet), self._on_presence)

    # ------------------------------------------------------------------------------------- sampling
    def _pick_stragglers(self) -> set[int]:
        n = int(self.s.num_clients * self.s.straggler_ratio)
        rng = np.random.default_rng(self.s.seed + 1)
        return set(rng.choice(self.s.num_clients, n, replace=False).tolist()) if n else set()

    def population(self) -> list[int]:
        """The devices that can be sampled, sorted: rebuilt only after a presence changed who is online, so a
        round costs O(sampled), not O(fleet), while the fleet is steady (callers must not modify it)."""
        key = (id(self.online), len(self.online))  # also catches `online` replaced or changed from outside
        if self._population is None or self._population_key != key:
            self._population_key = key
            if self.s.track_presence:
                self._population = sorted(c for c in self.online if 0 <= c < self.s.num_clients)
            else:
                self._population = list(range(self.s.num_clients))
        return self._population

    def sample(self) -> list[int]:
        pop = self.population()
        k = min(len(pop), max(1, int(self.s.num_clients * self.s.join_ratio)))
        return [pop[i] for i in self.rng.choice(len(pop), k, replace=False).tolist()] if k else []

    def _local_epoch(self, cid: int) -> int:
        if cid in self.stragglers and self.s.local_epoch > self.s.straggler_min_local_epoch:
            return int(self.rng.integers(self.s.straggler_min_local_epoch, self.s.local_epoch))
        return self.s.local_epoch

    def wait_for_clients(self, count: int, timeout: float | None) -> bool:
        """Block until ``count`` clients are online (presence), or the timeout passes."""
        # len(online), not len(population()): presence admits only this fleet's ids, and the sorted population
        # rebuilt after each of 10,000 arriving presences made registration quadratic
        online = (lambda: len(self.online)) if self.s.track_presence else (lambda: self.s.num_clients)
        return self.transport.run_until(lambda: online() >= count, timeout)

    # ------------------------------------------------------------------------------------- messages
    def _send(self, rnd: int, cid: int, task: Task) -> int:
        header = Header(
            type="task", fleet=self.fleet, round=rnd, client=cid, kind=task.kind, run=self.run_id, payload=task.config
        )
        frame = encode(header, task.arrays)
        self.asked[cid] = task
        self._frames[cid] = frame
        self.transport.publish(task_topic(self.fleet, cid), frame)
        return len(frame)

    def _reject(self, reason: str, detail: str, cid: int | None = None) -> None:
        self.rejected[reason] += 1
        known = cid if cid is not None and 0 <= cid < self.s.num_clients else None
        if self.events:
            self.events.emit(ev.UpdateRejected(self.current_round, known, reason))
        # A flood must not fill the log: the first few of each (reason, device), then every 1000th.
        key = (reason, cid if cid is not None and 0 <= cid < self.s.num_clients else -1)
        self._logged[key] += 1
        n = self._logged[key]
        if n <= LOGGED_REJECTS or n % 1000 == 0:
            who = f"message of device {cid}" if cid is not None else "message"
            more = f" [{n} of these so far]" if n > LOGGED_REJECTS else ""
            log.warning("rejected %s: %s (%s)%s", who, detail, reason, more)

    def _on_presence(self, topic: str, payload: bytes) -> None:
        cid: int | None = None
        try:
            fleet, cid, leaf = _client_topic(topic)
            if fleet != self.fleet or leaf != "presence":
                raise Rejected("bad_presence", f"presence on {topic[:120]!r}")
            if cid >= self.s.num_clients:
                raise Rejected("unknown_device", f"device {cid} is not in this fleet of {self.s.num_clients}")
            try:
                presence = parse_presence(payload)
            except ValueError as e:
                raise Rejected("bad_presence", str(e)) from None
            if presence["client"] != cid:
                raise Rejected("spoofed_client", f"presence of device {presence['client']} on the topic of {cid}")
            self._apply_presence(cid, presence)
        except Rejected as r:
            self._reject(r.reason, r.detail, cid)
        except Exception as e:  # fault isolation: one device's message never takes the coordinator down
            self._reject("handler_error", f"presence on {topic[:120]!r}: {type(e).__name__}: {e}", cid)

    def _apply_presence(self, cid: int, presence: dict[str, Any]) -> None:
        state = presence["state"]
        if self.events:
            self.events.emit(ev.Presence(cid, state, presence.get("profile"), presence.get("reason"), time.time()))
        if state == "online":
            back = cid not in self.online
            if back:
                log.info("device %d online (profile %s)", cid, presence.get("profile", "not given"))
                self.online.add(cid)
                self._population = None
            self.health.pop(cid, None)
            self.offline_since.pop(cid, None)
            if "profile" in presence and self.profiles.get(cid) != presence["profile"]:
                self.profiles[cid] = presence["profile"]
                self._status_profiles = None
            # A device announces itself on every (re)connect, after it re-subscribed: if it owes the open round
            # an answer and was offline, or the broker went away since its task was sent, the task may be lost,
            # so it goes again (a repeat is answered from the device's cache, never trained twice).
            lost = back or self.transport.reconnects != self._sent_at_reconnects
            owes = cid in self.asked and cid in self._frames and cid not in self.inbox and cid not in self.failed
            if lost and owes:
                self.transport.publish(task_topic(self.fleet, cid), self._frames[cid])
            return
        if cid in self.online:
            self.offline_since[cid] = time.monotonic()
            self.online.discard(cid)
            self._population = None
        if state in ("unhealthy", "incompatible"):
            reason = presence.get("reason", "no reason given")
            if self.health.get(cid) != (state, reason):
                log.warning("device %d is %s: %s; not sampled until it is online again", cid, state, reason)
            self.health[cid] = (state, reason)

    def _on_update(self, topic: str, payload: bytes) -> None:
        cid: int | None = None
        try:
            _, cid, _ = _client_topic(topic)
            self._accept(topic, payload)
        except Rejected as r:
            self._reject(r.reason, r.detail, cid)
            owed = cid in self.asked and cid not in self.inbox
            if self.s.settle_on_bad_answer and r.reason in ANSWER_FAULTS and owed:
                self.failed.add(cid)  # its own (run, round, kind) answer, broken: stop waiting for it
        except Exception as e:  # fault isolation: one device's message never takes the coordinator down
            self._reject("handler_error", f"update on {topic[:120]!r}: {type(e).__name__}: {e}", cid)

    def _accept(self, topic: str, payload: bytes) -> None:
        """Check one update against the task its device was sent; on success it waits in the inbox."""
        if len(payload) > self.s.max_update_bytes:
            raise Rejected("oversized", f"{len(payload)} bytes on {topic} > {self.s.max_update_bytes}")
        try:
            header, arrays = decode(payload)
        except DecodeError as e:
            raise Rejected("malformed", str(e)) from None
        if header.type != "update" or header.fleet != self.fleet:
            raise Rejected("wrong_fleet", f"{header.type} for fleet {header.fleet[:64]!r}")
        if topic.split("/")[-2] != str(header.client):
            raise Rejected("spoofed_client", f"client {header.client} published on {topic}")
        cid = header.client
        if header.run != self.run_id:
            raise Rejected("wrong_run", f"client {cid}: run {header.run!r} is not this run ({self.run_id})")
        if header.round != self.current_round:
            raise Rejected("wrong_round", f"client {cid} round {header.round} != {self.current_round}")
        task = self.asked.get(cid)
        if task is None:
            raise Rejected("unexpected_client", f"client {cid} was not tasked in round {header.round}")
        if cid in self.inbox:
            raise Rejected("duplicate", f"client {cid} round {header.round}")
        if header.kind != task.kind:
            raise Rejected("wrong_kind", f"client {cid}: a {header.kind[:16]!r} answer to a {task.kind!r} task")
        cap = self.s.max_num_samples
        if self.s.train_sizes is not None and cid in self.s.train_sizes:
            cap = self.s.train_sizes[cid]
        num_samples = check_num_samples(header.num_samples, cap, 1 if task.kind == "fit" else 0)
        extra = set(header.payload) - {"metrics", "info"}
        if extra:
            raise Rejected("bad_info", f"client {cid}: unknown payload entries {sorted(extra)[:3]}")
        check_arrays(arrays, self.strategy.expected_upload(task), self.strategy.ctx.spec.initial)
        metrics = check_metrics(header.payload.get("metrics", {}), self.s.max_num_samples)
        info = check_info(header.payload.get("info", {}), self.strategy.Info)
        self.bytes_up += len(payload)
        self.inbox[cid] = Update(header.round, arrays, num_samples, metrics, info)
        if self.events:
            self.events.emit(ev.UpdateAccepted(header.round, cid, len(payload), num_samples, task.kind))

    # ------------------------------------------------------------------------------------- collecting
    def _collect(self, rnd: int, cids: Sequence[int], kind: str, sequential: bool) -> tuple[list[int], int]:
        """Send ``kind`` tasks to ``cids`` and wait for their updates; returns (answered, bytes down)."""
        self.current_round, self.inbox, self.asked, self._frames, self.failed = rnd, {}, {}, {}, set()
        down = 0
        answered: list[int] = []
        if sequential:
            groups = [[c] for c in cids]
        elif kind == "evaluate":  # every device of a fleet: in groups, so only a group's tasks are held at once
            groups = [list(cids[i : i + EVALUATE_GROUP]) for i in range(0, len(cids), EVALUATE_GROUP)]
        else:
            groups = [list(cids)]
        for group in groups:
            seen = self.transport.reconnects  # before sending: a reconnect while sending counts too
            self._sent_at_reconnects = seen
            for cid in group:
                task = self.strategy.task_for(rnd, cid, "fit" if kind == "fit" else "evaluate")
                if kind == "fit":
                    task.config = {**task.config, "local_epoch": self._local_epoch(cid)}
                    if self.s.update_codec != "none":
                        task.config["update_codec"] = self.s.update_codec
                down += self._send(rnd, cid, task)
            self._wait(rnd, group, seen)
            if kind == "fit":
                self._clip(rnd, [c for c in group if c in self.inbox])
            for cid in group:
                if cid not in self.inbox:
                    gone = "" if cid in self.online or not self.s.track_presence else " (it went offline)"
                    log.warning("round %d: client %d did not answer%s", rnd + 1, cid, gone)
                    continue
                if kind == "fit":
                    try:
                        self.strategy.on_update(rnd, cid, self.inbox[cid])
                    except Exception as e:  # the strategy could not take it: drop this update, keep the round
                        del self.inbox[cid]
                        self._reject("strategy_error", f"round {rnd + 1}: {type(e).__name__}: {e}", cid)
                        continue
                answered.append(cid)
            if kind == "evaluate":  # done with this group: its tasks (a body each) need not be kept
                for cid in group:
                    self.asked.pop(cid, None)
                    self._frames.pop(cid, None)
        self.asked = {}  # late answers are rejected from now on
        return answered, down

    def _gone(self, cid: int) -> bool:
        """Known not to answer: unhealthy, incompatible, or offline for longer than the grace."""
        if cid in self.online:
            return False
        since = self.offline_since.get(cid)
        return cid in self.health or since is None or time.monotonic() - since >= self.s.offline_grace

    def _wait(self, rnd: int, group: list[int], seen: int) -> None:
        """Until the group answered, every device still outstanding is known to be gone, or the deadline;
        after a broker outage the unanswered tasks go out again (a device resends a task it already did)."""

        def settled() -> bool:
            outstanding = [c for c in group if c not in self.inbox and c not in self.failed]
            return not outstanding or (self.s.track_presence and all(self._gone(c) for c in outstanding))

        while True:
            self.transport.run_until(lambda s=seen: settled() or self.transport.reconnects != s, self.s.deadline)
            if settled() or self.transport.reconnects == seen:
                return
            seen = self.transport.reconnects
            outstanding = [c for c in group if c not in self.inbox]
            log.warning("round %d: the broker connection came back; re-sending %d tasks", rnd + 1, len(outstanding))
            for cid in outstanding:
                self.transport.publish(task_topic(self.fleet, cid), self._frames[cid])

    def _clip(self, rnd: int, cids: list[int]) -> None:
        """Scale updates longer than clip_factor x the median update norm (this round's and recent ones) back
        to the median norm, weights and BN statistics each against their own median."""
        norms = {cid: update_norms(self.inbox[cid].arrays, self.asked[cid].arrays) for cid in cids}
        clipped: set[int] = set()
        for group in GROUPS:
            current = [n[group] for n in norms.values() if group in n]
            history = self.norm_history.setdefault(group, [])
            bound = clip_bound(history[-NORM_WINDOW:] + current, self.s.clip_factor)
            self.norm_history[group] = (history + current)[-NORM_WINDOW:]
            if bound is None:
                continue
            threshold, target = bound
            for cid, n in norms.items():
                if n.get(group, 0.0) > threshold:
                    update = self.inbox[cid]
                    update.arrays = clip_update(update.arrays, self.asked[cid].arrays, n[group], target, group)
                    clipped.add(cid)
                    log.info("round %d: clipped the %s update of device %d from norm %.3g to the median %.3g",
                             rnd + 1, group, cid, n[group], target)
        self.clipped += len(clipped)

    def _aggregate(self, rnd: int, answered: list[int]) -> dict[str, Any]:
        """The strategy's aggregation, with fault isolation: if it raises, each update is tried alone on a
        copy of the strategy's state, the ones that break it are rejected, and the rest are aggregated."""
        updates = {c: self.inbox[c] for c in answered}
        snapshot = self._strategy_snapshot()
        try:
            return self.strategy.aggregate(rnd, updates)
        except Exception as e:
            log.warning("round %d: aggregation failed (%s: %s); finding the update that broke it",
                        rnd + 1, type(e).__name__, e)
        bad: list[int] = []
        for cid in answered:
            self._strategy_restore(snapshot)
            try:
                self.strategy.aggregate(rnd, {cid: updates[cid]})
            except Exception as e:
                bad.append(cid)
                self._reject("aggregation_error", f"round {rnd + 1}: {type(e).__name__}: {e}", cid)
        good = {c: u for c, u in updates.items() if c not in bad}
        self._strategy_restore(snapshot)
        for cid in bad:
            answered.remove(cid)
            self.inbox.pop(cid, None)
        try:
            return self.strategy.aggregate(rnd, good) if good else {"aggregated": False}
        except Exception as e:  # together they still fail: keep the model as it was
            self._strategy_restore(snapshot)
            log.warning("round %d: not aggregated: %s: %s", rnd + 1, type(e).__name__, e)
            return {"aggregated": False}

    def _strategy_snapshot(self) -> dict[str, Any]:
        # Everything the strategy holds (declared state and what begin_round prepared), to retry from.
        return copy.deepcopy({k: v for k, v in vars(self.strategy).items() if k not in ("params", "ctx")})

    def _strategy_restore(self, snapshot: dict[str, Any]) -> None:
        vars(self.strategy).update(copy.deepcopy(snapshot))

    # ------------------------------------------------------------------------------------- the loop
    def _rejoin_after_outage(self) -> None:
        """After a broker outage, give the devices that were online before it time to announce themselves."""
        if not self.s.track_presence or self.transport.reconnects == self._sampled_at_reconnects:
            return
        before = set(self._last_population)
        missing = before - self.online
        if missing:
            log.info("the broker was away: waiting up to %.0f s for %d devices to come back", self.s.rejoin_wait,
                     len(missing))
            self.transport.run_until(lambda: before <= self.online, self.s.rejoin_wait)

    def run_round(self, rnd: int) -> RoundRecord:
        start = time.perf_counter()
        self._rejoin_after_outage()
        # the cached list itself (never modified, only replaced): O(1) per round, made a set only after an outage
        self._last_population, self._sampled_at_reconnects = self.population(), self.transport.reconnects
        cids = self.sample()
        if self.events:
            self.events.emit(ev.RoundStarted(rnd, self.strategy.phase(rnd), tuple(cids), self.s.deadline,
                                             self.s.min_clients, time.time()))
        self.strategy.begin_round(rnd, cids)
        aggregate_seconds = time.perf_counter() - start
        self.bytes_up = 0
        clipped_before = self.clipped
        answered, down = self._collect(rnd, cids, "fit", self.strategy.sequential(rnd))
        agg_start = time.perf_counter()
        if len(answered) < self.s.min_clients:
            log.warning("round %d: %d of %d clients answered, below min_clients=%d: not aggregated",
                        rnd + 1, len(answered), len(cids), self.s.min_clients)
            facts: dict[str, Any] = {"aggregated": False}
        else:
            facts = self._aggregate(rnd, answered)
            log.info("round %d: aggregated %d of %d clients", rnd + 1, len(answered), len(cids))
        aggregate_seconds += time.perf_counter() - agg_start
        metrics = pooled([self.inbox[c] for c in answered if c in self.inbox])
        fit = [self.inbox[c].metrics.get("fit_seconds", 0.0) for c in answered if c in self.inbox]
        facts["aggregate_seconds"] = aggregate_seconds
        facts["fit_seconds_max"] = max(fit, default=0.0)
        facts["fit_seconds_sum"] = sum(fit)
        if self.clipped != clipped_before:
            facts["clipped"] = self.clipped - clipped_before
        up = self.bytes_up
        if self.s.test_gap and (rnd + 1) % self.s.test_gap == 0 and rnd + 1 < self.s.global_epoch:
            metrics.update({f"all_{k}": v for k, v in self.evaluate_all(rnd).items()})
        seconds = time.perf_counter() - start
        return RoundRecord(rnd, self.strategy.phase(rnd), cids, metrics, down, up, seconds, facts, answered)

    def evaluate_all(self, rnd: int) -> dict[str, float]:
        """Personalized accuracy of every (online) client: its body from the cloud + its own local layers."""
        answered, _ = self._collect(rnd, self.population(), "evaluate", sequential=False)
        return pooled([self.inbox[c] for c in answered])

    def run(self, on_round: Callable[[RoundRecord], None] | None = None) -> list[RoundRecord]:
        if self.checkpoint is not None and not self.checkpoint.is_file():
            self.save_checkpoint()  # the run id is on disk before any task carries it
        self.publish_status("running")
        self.events.emit(ev.RunStarted(self.fleet, self.strategy.name, self.s.num_clients, self.s.global_epoch,
                                       self.s.join_ratio, self.s.min_clients, self.s.deadline, self.next_round,
                                       dict(self.run_info), tuple(self.records)))
        while self.next_round < self.s.global_epoch:
            record = self.run_round(self.next_round)
            self.records.append(record)
            self.next_round += 1
            self.save_checkpoint()
            self.publish_status("running", record)
            self.events.emit(ev.RoundClosed(record, self.strategy_view(), dict(self.rejected), time.time()))
            if on_round is not None:
                on_round(record)
        return self.records

    def finish(self, final: dict[str, float], seconds: float) -> None:
        """The run is over: ``final`` is every device's evaluation; tells the event stream's subscribers."""
        self.events.emit(ev.RunFinished(final, self.strategy.summary(), dict(self.rejected), self.clipped, seconds))

    def strategy_view(self) -> dict[str, Any]:
        """What a viewer shows of the strategy after a round: the layer vote and (for similarity-weighted
        strategies) the similarity matrix among at most MAX_SIMILARITY_SHOWN of the devices it holds."""
        if not self.events.wants_strategy_view():
            return {}  # nobody shows it: the run-folder writer alone costs nothing here
        summary = self.strategy.summary()
        view: dict[str, Any] = {k: summary[k] for k in ("chosen_layer", "vote_counts") if summary.get(k) is not None}
        sim = getattr(self.strategy, "sim", None)
        if isinstance(sim, np.ndarray) and sim.ndim == 2 and sim.shape[0] == sim.shape[1] and sim.size:
            ids = getattr(self.strategy, "sim_clients", None)  # the rows' client ids; None: indexed by client id
            if isinstance(ids, list) and len(ids) == sim.shape[0]:
                pos = np.arange(min(len(ids), MAX_SIMILARITY_SHOWN))
                clients = [int(ids[i]) for i in pos]
            else:
                pos = np.flatnonzero(~np.isnan(np.diagonal(sim)))[:MAX_SIMILARITY_SHOWN]  # s_ii is set when held
                clients = pos.tolist()
            if len(pos):
                block = sim[np.ix_(pos, pos)]
                view["similarity"] = {
                    "clients": clients,
                    "matrix": [[None if np.isnan(v) else round(float(v), 4) for v in row] for row in block],
                }
        return view

    # ------------------------------------------------------------------------------------- state
    def publish_status(self, state: str, record: RoundRecord | None = None) -> None:
        """The retained status: bounded by construction (profiles and reasons come from bounded schemas,
        distinct profiles are capped, reject reasons are this file's own names)."""
        population = self.population()  # recounted only when who is online (or a profile) changed
        if self._status_profiles is None or self._status_profiles[0] is not population:
            profiles = Counter(self.profiles[c] for c in self.online if c in self.profiles)
            shown = dict(profiles.most_common(MAX_STATUS_PROFILES))
            if len(profiles) > MAX_STATUS_PROFILES:
                shown["other"] = sum(profiles.values()) - sum(shown.values())
            self._status_profiles = (population, shown)
        shown = dict(self._status_profiles[1])
        status = {
            "state": state,
            "fleet": self.fleet,
            "run_id": self.run_id,
            "next_round": self.next_round,
            "global_epoch": self.s.global_epoch,
            "online": len(self.online),
            "profiles": shown,
            "unhealthy": sum(1 for s, _ in self.health.values() if s == "unhealthy"),
            "incompatible": sum(1 for s, _ in self.health.values() if s == "incompatible"),
            "rejected": dict(self.rejected),
            "clipped": self.clipped,
            # what the transport itself refused or dropped (chunk floods, junk frames), by kind
            "transport_dropped": dict(getattr(self.transport, "dropped", {}) or {}),
            "run": self.run_info,
        }
        if record is not None:
            status["last_round"] = {"round": record.round + 1, "phase": record.phase, "metrics": record.metrics,
                                    "answered": len(record.answered), "sampled": len(record.clients)}
        self.transport.publish(status_topic(self.fleet), json.dumps(status).encode(), retain=True)

    def save_checkpoint(self) -> None:
        if self.checkpoint is None:
            return
        try:
            self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DiskError(f"could not create the folder of {self.checkpoint}: {e.strerror or e}", e.errno) from e
        save_state_file(
            self.checkpoint,
            {
                "run_id": self.run_id,
                "next_round": self.next_round,
                "rng": self.rng,
                "stragglers": self.stragglers,
                "records": [asdict(r) for r in self.records],
                "rejected": self.rejected,
                "clipped": self.clipped,
                "norm_history": self.norm_history,
                "strategy": self.strategy.state_dict(),
            },
            {"kind": "fedcmd-coordinator-checkpoint", "fleet": self.fleet, "algo": self.strategy.name},
        )

    def _restore(self, path: Path) -> None:
        values, meta = load_state_file(path)
        if meta.get("fleet") != self.fleet or meta.get("algo") != self.strategy.name:
            raise ValueError(
                f"checkpoint {path} is for fleet {meta.get('fleet')!r} / {meta.get('algo')!r}, "
                f"not {self.fleet!r} / {self.strategy.name!r}: move it away or point --checkpoint elsewhere"
            )
        self.run_id = str(values.get("run_id") or self.run_id)
        self.next_round = int(values["next_round"])
        self.rng = values["rng"]
        self.stragglers = set(values["stragglers"])
        self.records = [RoundRecord(**r) for r in values["records"]]
        self.rejected = Counter(values["rejected"])
        self.clipped = int(values.get("clipped", 0))
        history = values.get("norm_history", {})
        if isinstance(history, dict):
            self.norm_history = {g: [float(v) for v in vs] for g, vs in history.items()}
        try:
            self.strategy.load_state_dict(values.get("strategy"))
        except StateVersionError as e:
            raise StateVersionError(f"checkpoint {path}: {e}") from None
        log.info("resumed from %s at round %d (run %s)", path, self.next_round + 1, self.run_id)
