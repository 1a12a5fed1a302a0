"""The coordinator: the round loop. Samples online clients, sends tasks, collects updates until every
client answered or the deadline passed, lets the server strategy aggregate, checkpoints, and publishes
a retained status. It talks only through a Transport, so one loop serves simulation and deployment."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcmd_core.state_tree import load_state_file, save_state_file
from fedcmd_core.strategies import ServerStrategy, Task, Update
from protocols.codec import DecodeError, Header, decode, encode
from protocols.topics import parse_presence, presence_filter, status_topic, task_topic, updates_filter
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
    # round (and of recent rounds) is scaled down to that length; 0 turns clipping off.
    clip_factor: float = 3.0


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
    ) -> None:
        self.transport = transport
        self.strategy = strategy
        self.fleet = fleet
        self.s = settings
        self.checkpoint = checkpoint
        self.run_info = run_info or {}  # published in the status: what agents need to build their side
        self.rng = np.random.default_rng(settings.seed)
        self.stragglers = self._pick_stragglers()
        self.next_round = 0
        self.records: list[RoundRecord] = []
        self.rejected: Counter[str] = Counter()
        self.online: set[int] = set()
        self.profiles: dict[int, str] = {}  # device profile each device reported in its presence
        self.inbox: dict[int, Update] = {}
        self.expected: set[int] = set()
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
        if self.s.track_presence:
            return sorted(c for c in self.online if 0 <= c < self.s.num_clients)
        return list(range(self.s.num_clients))

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
        return self.transport.run_until(lambda: len(self.population()) >= count, timeout)

    # ------------------------------------------------------------------------------------- messages
    def _send(self, rnd: int, cid: int, task: Task) -> int:
        header = Header(type="task", fleet=self.fleet, round=rnd, client=cid, kind=task.kind, payload=task.config)
        frame = encode(header, task.arrays)
        self.transport.publish(task_topic(self.fleet, cid), frame)
        return len(frame)

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        log.warning("rejected update: %s (%s)", detail, reason)

    def _on_presence(self, topic: str, payload: bytes) -> None:
        try:
            cid = int(topic.split("/")[-2])
            presence = parse_presence(payload)
            if presence["client"] != cid:
                raise ValueError(f"presence of client {presence['client']} on the topic of client {cid}")
        except (ValueError, IndexError) as e:
            self.rejected["bad_presence"] += 1
            log.warning("rejected presence message on %s: %s", topic, e)
            return
        if presence["state"] == "online":
            if cid not in self.online:
                log.info("device %d online (profile %s)", cid, presence.get("profile", "not given"))
            self.online.add(cid)
            if isinstance(presence.get("profile"), str):
                self.profiles[cid] = presence["profile"]
        else:
            self.online.discard(cid)

    def _check_arrays(self, arrays: dict[str, np.ndarray]) -> str | None:
        """Why these arrays cannot come from a device running this model (None when they can).
        Keys are model entries, optionally behind a strategy prefix (``delta::fc2.0.weight``)."""
        initial = self.strategy.ctx.spec.initial
        for key, value in arrays.items():
            name = key.rsplit("::", 1)[-1]
            ref = initial.get(name)
            if ref is None:
                return f"unknown tensor {key!r}"
            if value.size != ref.size or (value.shape != ref.shape and value.ndim and ref.ndim):
                return f"{key}: shape {value.shape}, expected {ref.shape}"
            if np.issubdtype(ref.dtype, np.floating) != np.issubdtype(value.dtype, np.floating):
                return f"{key}: dtype {value.dtype}, expected {ref.dtype}"
        return None

    def _on_update(self, topic: str, payload: bytes) -> None:
        if len(payload) > self.s.max_update_bytes:
            self._reject("oversized", f"{len(payload)} bytes on {topic} > {self.s.max_update_bytes}")
            return
        try:
            header, arrays = decode(payload)
        except DecodeError as e:
            self._reject("malformed", str(e))
            return
        if header.type != "update" or header.fleet != self.fleet:
            self._reject("wrong_fleet", f"{header.type} for fleet {header.fleet!r}")
            return
        if topic.split("/")[-2] != str(header.client):
            self._reject("spoofed_client", f"client {header.client} published on {topic}")
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
        problem = self._check_arrays(arrays)
        if problem is not None:
            self._reject("bad_tensors", f"client {header.client}: {problem}")
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
                    if self.s.update_codec != "none":
                        task.config["update_codec"] = self.s.update_codec
                down += self._send(rnd, cid, task)
            self.transport.run_until(lambda g=group: all(c in self.inbox for c in g), self.s.deadline)
            for cid in group:
                if cid in self.inbox:
                    answered.append(cid)
                    if kind == "fit":
                        self.strategy.on_update(rnd, cid, self.inbox[cid])
                else:
                    log.warning("round %d: client %d did not answer before the deadline", rnd + 1, cid)
        self.expected = set()  # late answers are rejected from now on
        return answered, down

    # ------------------------------------------------------------------------------------- the loop
    def run_round(self, rnd: int) -> RoundRecord:
        start = time.perf_counter()
        cids = self.sample()
        self.strategy.begin_round(rnd, cids)
        aggregate_seconds = time.perf_counter() - start
        self.bytes_up = 0
        answered, down = self._collect(rnd, cids, "fit", self.strategy.sequential(rnd))
        agg_start = time.perf_counter()
        if len(answered) < self.s.min_clients:
            log.warning("round %d: %d of %d clients answered, below min_clients=%d: not aggregated",
                        rnd + 1, len(answered), len(cids), self.s.min_clients)
            self.strategy.pending.clear()
            facts: dict[str, Any] = {"aggregated": False}
        else:
            facts = self.strategy.end_round(rnd, answered)
            log.info("round %d: aggregated %d of %d clients", rnd + 1, len(answered), len(cids))
        aggregate_seconds += time.perf_counter() - agg_start
        metrics = pooled([self.inbox[c] for c in answered if c in self.inbox])
        fit = [self.inbox[c].metrics.get("fit_seconds", 0.0) for c in answered if c in self.inbox]
        facts["aggregate_seconds"] = aggregate_seconds
        facts["fit_seconds_max"] = max(fit, default=0.0)
        facts["fit_seconds_sum"] = sum(fit)
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
        self.publish_status("running")
        while self.next_round < self.s.global_epoch:
            record = self.run_round(self.next_round)
            self.records.append(record)
            self.next_round += 1
            self.save_checkpoint()
            self.publish_status("running", record)
            if on_round is not None:
                on_round(record)
        return self.records

    # ------------------------------------------------------------------------------------- state
    def publish_status(self, state: str, record: RoundRecord | None = None) -> None:
        status = {
            "state": state,
            "fleet": self.fleet,
            "next_round": self.next_round,
            "global_epoch": self.s.global_epoch,
            "online": len(self.online),
            "profiles": dict(Counter(self.profiles[c] for c in self.online if c in self.profiles)),
            "rejected": dict(self.rejected),
            "run": self.run_info,
        }
        if record is not None:
            status["last_round"] = {"round": record.round + 1, "phase": record.phase, "metrics": record.metrics,
                                    "answered": len(record.answered), "sampled": len(record.clients)}
        self.transport.publish(status_topic(self.fleet), json.dumps(status).encode(), retain=True)

    def save_checkpoint(self) -> None:
        if self.checkpoint is None:
            return
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        save_state_file(
            self.checkpoint,
            {
                "next_round": self.next_round,
                "rng": self.rng,
                "stragglers": self.stragglers,
                "records": [asdict(r) for r in self.records],
                "rejected": self.rejected,
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
        self.next_round = int(values["next_round"])
        self.rng = values["rng"]
        self.stragglers = set(values["stragglers"])
        self.records = [RoundRecord(**r) for r in values["records"]]
        self.rejected = Counter(values["rejected"])
        self.strategy.load_state_dict(values["strategy"])
        log.info("resumed from %s at round %d", path, self.next_round + 1)
