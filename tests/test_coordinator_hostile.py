"""Issue 10: one device must never crash or poison the coordinator.

A hostile device here is a real agent whose outgoing update frames are rewritten on their way to the
broker (the in-memory transport), exactly as a device we do not control could send them: every frame
still passes the old checks (own topic, own task, right round) but breaks something deeper."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from cloud.config import resolve
from cloud.service.coordinator import Coordinator, RoundSettings
from cloud.sim.simulate import FLEET, build_and_run, make_agent, prepare, run_coordinator
from fedcmd_core import robust
from fedcmd_core.runspec import RunSpec, build_server
from fedcmd_core.strategies import Task
from fedcmd_core.strategies.fedavg import FedAvgServer
from protocols.codec import Header, decode, encode
from protocols.memory import MemoryTransport
from protocols.topics import presence_payload, presence_topic, status_topic, task_topic, update_topic

Mutation = Callable[[Header, dict[str, np.ndarray]], tuple[Header, dict[str, np.ndarray]]]
HOSTILE = {0, 3, 6, 9}  # of 10 devices: every round samples some of them


class Tampering(MemoryTransport):
    """Rewrites the update frames of the HOSTILE devices (and counts that the fault really went out)."""

    def __init__(self, mutate: Mutation, only_kind: str = "fit", hostile: set[int] = HOSTILE) -> None:
        super().__init__()
        self.mutate = mutate
        self.hostile = hostile
        self.only_kind = only_kind
        self.tampered = 0

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        if any(topic == update_topic(FLEET, c) for c in self.hostile):
            header, arrays = decode(payload)
            if header.kind == self.only_kind:
                header, arrays = self.mutate(header, dict(arrays))
                payload = encode(header, arrays)
                self.tampered += 1
        super().publish(topic, payload, retain)


def _cfg(algo: str = "fedcmd", **extra: Any):
    values: dict[str, Any] = {
        "algo": algo, "dataset": "mnist5k", "client_num": 10, "alpha": 0.5, "join_ratio": 0.4, "global_epoch": 3,
        "local_epoch": 1, "seed": 5, "test_gap": 0, "save_log": False,
    }
    if algo == "fedcmd":
        values["hp"] = {"selection_rounds": 1}
    values.update(extra)
    return resolve({}, values)


def _drop_one(h: Header, a: dict) -> tuple[Header, dict]:
    a.pop(sorted(a)[0])
    return h, a


def _rename_one(h: Header, a: dict) -> tuple[Header, dict]:
    key = sorted(a)[0]
    a[key + "_x"] = a.pop(key)
    return h, a


def _info_list(h: Header, a: dict) -> tuple[Header, dict]:
    return h.model_copy(update={"payload": {**h.payload, "info": ["votes"]}}), a


def _vote_string(h: Header, a: dict) -> tuple[Header, dict]:
    return h.model_copy(update={"payload": {**h.payload, "info": {"votes": {"fc2": "many"}}}}), a


def _huge(h: Header, a: dict) -> tuple[Header, dict]:
    a = {k: (v * np.float32(1e30) if v.dtype == np.float32 else v) for k, v in a.items()}
    return h.model_copy(update={"num_samples": 2**62}), a


def _forged_counts(h: Header, a: dict) -> tuple[Header, dict]:
    metrics = dict(h.payload["metrics"])
    metrics["test_before_correct"] = 1e9
    return h.model_copy(update={"payload": {**h.payload, "metrics": metrics}}), a


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [(_drop_one, "bad_tensors"), (_rename_one, "bad_tensors"), (_info_list, "bad_info"),
     (_vote_string, "bad_info"), (_huge, "bad_count"), (_forged_counts, "bad_metrics")],
    ids=["missing-tensor", "renamed-tensor", "info-as-list", "vote-as-string", "1e30-and-2^62", "correct>count"],
)
def test_a_hostile_update_is_rejected_and_the_run_goes_on(mutate: Mutation, reason: str) -> None:
    transport = Tampering(mutate)
    result = build_and_run(_cfg(), transport=transport)
    assert transport.tampered > 0  # the fault went out
    assert result.rejected.get(reason, 0) == transport.tampered  # every forged frame, and for this reason
    assert len(result.records) == 3
    for r in result.records:
        assert not set(r.answered) & HOSTILE  # nothing of theirs reached an aggregate
        acc = r.metrics.get("test_before_acc")
        assert acc is not None and 0.0 <= acc <= 100.0
    assert 0.0 <= result.final["test_before_acc"] <= 100.0


def test_finite_but_huge_weights_are_clipped_not_aggregated_raw() -> None:
    """Weights of 1e30 (finite) with a believable sample count from one device: accepted, and clipped to the
    round's median update norm (clipping holds while fewer than half of the norms it sees are hostile)."""

    def scale(h: Header, a: dict) -> tuple[Header, dict]:
        return h, {k: (v.astype(np.float64) * 1e30).astype(np.float32) if v.dtype == np.float32 else v
                   for k, v in a.items()}

    transport = Tampering(scale, hostile={2, 7})
    result = build_and_run(_cfg("fedavg", global_epoch=4), transport=transport)
    assert transport.tampered > 0
    assert sum(r.facts.get("clipped", 0) for r in result.records) == transport.tampered
    for r in result.records:
        assert 0.0 <= r.metrics["test_before_acc"] <= 100.0
    assert result.final["test_before_acc"] > 10.0  # not a destroyed model


def test_a_replayed_fit_answer_is_not_taken_as_an_evaluation() -> None:
    spec = RunSpec(algo="fedavg", input_shape=(1, 28, 28), num_classes=10, num_clients=4, global_epoch=2)
    c = Coordinator(MemoryTransport(), build_server(spec), "f",
                    RoundSettings(num_clients=4, global_epoch=2, join_ratio=0.5, seed=0, local_epoch=1))
    c.current_round, c.inbox = 1, {}
    c.asked = {1: Task(1, "evaluate", {}, {})}
    fit = Header(type="update", fleet="f", round=1, client=1, num_samples=5, kind="fit", run=c.run_id,
                 payload={"metrics": {"test_before_correct": 3.0, "test_before_loss": 1.0, "test_before_count": 4.0}})
    c.transport.publish(update_topic("f", 1), encode(fit, {}))
    c.transport.run_until(lambda: False)
    assert c.inbox == {} and c.rejected["wrong_kind"] == 1
    other_run = fit.model_copy(update={"kind": "evaluate", "run": "0" * 16})
    c.transport.publish(update_topic("f", 1), encode(other_run, {}))
    c.transport.run_until(lambda: False)
    assert c.inbox == {} and c.rejected["wrong_run"] == 1
    c.transport.publish(update_topic("f", 1), encode(fit.model_copy(update={"kind": "evaluate"}), {}))
    c.transport.run_until(lambda: False)
    assert set(c.inbox) == {1}


class RaisingAggregation(FedAvgServer):
    """An algorithm whose aggregation breaks on one device's update (device 3's)."""

    def aggregate(self, rnd: int, updates: Any) -> dict[str, Any]:
        if 3 in updates:
            raise KeyError("device 3 broke the aggregation")
        return super().aggregate(rnd, updates)


class RaisingOnUpdate(FedAvgServer):
    def on_update(self, rnd: int, cid: int, update: Any) -> None:
        if cid == 3:
            raise TypeError("device 3 broke on_update")


@pytest.mark.parametrize(("server_cls", "reason"),
                         [(RaisingAggregation, "aggregation_error"), (RaisingOnUpdate, "strategy_error")])
def test_an_exception_for_one_update_drops_that_update_only(server_cls: type, reason: str) -> None:
    cfg = _cfg("fedavg", global_epoch=4, join_ratio=0.5)
    p = prepare(cfg)
    p.server = server_cls(p.server.params, p.server.ctx)
    transport = MemoryTransport()
    for cid in range(p.partition.num_clients):
        make_agent(p, transport, cid).announce()
    result = run_coordinator(p, transport)
    sampled_3 = [r for r in result.records if 3 in r.clients]
    assert sampled_3, "device 3 was never sampled: the fault was not injected"
    assert result.rejected[reason] == len(sampled_3)
    for r in result.records:
        assert 3 not in r.answered
        assert r.facts.get("aggregated", True)  # the others were aggregated
        assert len(r.answered) == len(r.clients) - (3 in r.clients)


def test_presence_is_a_bounded_schema_and_the_status_stays_small() -> None:
    spec = RunSpec(algo="fedavg", input_shape=(1, 28, 28), num_classes=10, num_clients=50, global_epoch=2)
    c = Coordinator(MemoryTransport(), build_server(spec), "f",
                    RoundSettings(num_clients=50, global_epoch=2, join_ratio=0.5, seed=0, local_epoch=1,
                                  track_presence=True))
    t = c.transport
    huge = json.dumps({"state": "online", "client": 1, "profile": "x" * 480_000}).encode()
    t.publish(presence_topic("f", 1), huge)
    t.publish(presence_topic("f", 2), json.dumps({"state": "online", "client": 2, "profile": "p" * 33}).encode())
    t.publish(presence_topic("f", 77), presence_payload(77, "online"))  # not in this fleet of 50
    t.publish(presence_topic("f", 4), json.dumps({"state": "online", "client": 4, "extra": 1}).encode())
    for cid in range(5, 45):
        t.publish(presence_topic("f", cid), presence_payload(cid, "online", profile=f"board-{cid}-" + "y" * 20))
    t.run_until(lambda: False)
    assert c.rejected["bad_presence"] == 3 and c.rejected["unknown_device"] == 1
    assert c.online == set(range(5, 45))
    seen: list[bytes] = []
    t.subscribe(status_topic("f"), lambda topic, payload: seen.append(payload))
    c.publish_status("running")
    t.run_until(lambda: False)
    status = json.loads(seen[-1])
    assert len(status["profiles"]) == 17 and status["profiles"]["other"] == 40 - 16
    assert len(seen[-1]) < 8192


def test_unhealthy_devices_are_not_sampled_and_a_round_closes_when_its_devices_are_gone() -> None:
    cfg = _cfg("fedavg", global_epoch=1, join_ratio=1.0)
    p = prepare(cfg)
    transport = MemoryTransport()
    for cid in range(p.partition.num_clients):
        if cid == 2:  # a device that takes its task and dies: only its last will ("offline") answers
            transport.subscribe(task_topic(FLEET, 2), lambda topic, payload: transport.publish(
                presence_topic(FLEET, 2), presence_payload(2, "offline"), retain=True))
            transport.publish(presence_topic(FLEET, 2), presence_payload(2, "online"), retain=True)
            continue
        make_agent(p, transport, cid).announce()
    transport.publish(presence_topic(FLEET, 7), presence_payload(7, "unhealthy", reason="disk full"), retain=True)
    started = time.monotonic()
    settings = RoundSettings(num_clients=10, global_epoch=1, join_ratio=1.0, seed=5, local_epoch=1,
                             track_presence=True, deadline=60.0)
    c = Coordinator(transport, p.server, FLEET, settings)
    transport.run_until(lambda: False)
    assert 7 not in c.online and c.health[7] == ("unhealthy", "disk full")
    record = c.run_round(0)
    assert time.monotonic() - started < 30  # did not wait out the 60 s deadline
    assert 7 not in record.clients and 2 in record.clients and 2 not in record.answered
    assert len(record.answered) == 8


def test_robust_means_against_numpy() -> None:
    rng = np.random.default_rng(0)
    states = [{"w": rng.normal(size=(4, 3)).astype(np.float32), "n": np.array(i, dtype=np.int64)} for i in range(7)]
    states[2]["w"][:] = 1e6  # one hostile state
    states[5]["n"] = np.array(2**40, dtype=np.int64)
    stack = np.stack([s["w"] for s in states]).astype(np.float64)
    med = robust.aggregate(states, [1.0] * 7, ["w", "n"], "median")
    np.testing.assert_allclose(med["w"], np.median(stack, axis=0), rtol=1e-6)
    assert int(med["n"]) == 3
    trimmed = robust.aggregate(states, [1.0] * 7, ["w"], "trimmed_mean", trim_ratio=0.2)  # drops 1 each end
    srt = np.sort(stack, axis=0)
    np.testing.assert_allclose(trimmed["w"], srt[1:-1].mean(axis=0), rtol=1e-5)
    assert float(np.abs(trimmed["w"]).max()) < 10
    plain = robust.aggregate(states, [1.0] * 7, ["w"], "mean")
    assert float(np.abs(plain["w"]).max()) > 1e5  # the mean is what the attacker moves


def test_clipping_scales_back_along_the_update() -> None:
    sent = {"w": np.zeros(4, dtype=np.float32), "n": np.array(3)}
    honest = [{"w": np.full(4, s, dtype=np.float32), "n": np.array(4)} for s in (0.5, 1.0, 1.5)]
    norms = [robust.update_norm(u, sent) for u in honest]
    assert norms == pytest.approx([1.0, 2.0, 3.0])
    bound = robust.clip_bound([*norms, 2e6], 3.0)
    assert bound == pytest.approx((3.0 * 2.5, 2.5))  # outliers beyond 3 x the median go to the median
    attacked = {"w": np.full(4, 1e6, dtype=np.float32), "n": np.array(4)}
    clipped = robust.clip_update(attacked, sent, robust.update_norm(attacked, sent) or 0.0, bound[1])
    assert robust.update_norm(clipped, sent) == pytest.approx(2.5, rel=1e-5)
    np.testing.assert_allclose(clipped["w"] / clipped["w"][0], 1.0)  # same direction
    assert robust.clip_bound([1.0, 2.0], 0.0) is None


class Networked(Tampering):
    """Like a network transport, run_until blocks until done() or the timeout when nothing more arrives."""

    def run_until(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        if super().run_until(done, timeout) or timeout is None:
            return done()
        time.sleep(timeout)
        return done()


def test_a_rejected_answer_ends_the_wait_for_that_device() -> None:
    """Behind per-device ACLs (settle_on_bad_answer) a device's broken answer is its last for the task."""
    def nan(h: Header, a: dict) -> tuple[Header, dict]:
        return h, {k: np.full_like(v, np.nan) if v.dtype == np.float32 else v for k, v in a.items()}

    transport = Networked(nan, hostile={3})
    p = prepare(_cfg("fedavg", global_epoch=1, join_ratio=1.0))
    for cid in range(p.partition.num_clients):
        make_agent(p, transport, cid).announce()
    settings = RoundSettings(num_clients=10, global_epoch=1, join_ratio=1.0, seed=5, local_epoch=1,
                             track_presence=True, deadline=30.0, settle_on_bad_answer=True)
    c = Coordinator(transport, p.server, FLEET, settings)
    transport.run_until(lambda: len(c.online) == 10, 1.0)
    started = time.monotonic()
    record = c.run_round(0)
    assert transport.tampered == 1 and c.rejected["non_finite"] == 1
    assert record.answered == [x for x in record.clients if x != 3]
    assert time.monotonic() - started < 15  # not the 30 s deadline


def test_a_malformed_device_topic_is_its_own_reject_reason() -> None:
    spec = RunSpec(algo="fedavg", input_shape=(1, 28, 28), num_classes=10, num_clients=4, global_epoch=2)
    c = Coordinator(MemoryTransport(), build_server(spec), "f",
                    RoundSettings(num_clients=4, global_epoch=2, join_ratio=0.5, seed=0, local_epoch=1))
    for leaf in ("update", "presence"):
        for bad in ("007", "01", " 1", "1" * 19):
            c.transport.publish(f"fedcmd/f/client/{bad}/{leaf}", b"{}")
    c.transport.run_until(lambda: False)
    assert dict(c.rejected) == {"bad_topic": 8}  # not handler_error, which is kept for real surprises
