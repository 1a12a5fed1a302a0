"""``fedcmd bench hostile`` in small: a real coordinator and agents over mosquitto while a hostile client
sends hypothesis-drawn forgeries on the devices' own topics. Nothing crashes, every forgery that reached the
coordinator is counted as a reject, none gets into an aggregate (the run equals the clean run, bit for bit)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("paho.mqtt")
pytest.importorskip("hypothesis")

from cloud.bench.hostile import Forger, TaskSeen, Templates, build_message, generate_plans, passed, run_bench
from protocols.broker import mosquitto_path

pytestmark = pytest.mark.skipif(mosquitto_path() is None, reason="needs mosquitto")


def test_plans_are_reproducible_and_every_forgery_is_near_valid() -> None:
    """The same seed draws the same plans; each update plan carries at least one invalid mutation."""
    a, b = generate_plans(120, 20, seed=3), generate_plans(120, 20, seed=3)
    assert repr(a) == repr(b)
    assert repr(a) != repr(generate_plans(120, 20, seed=4))
    updates = [p for p in a if p["cat"] == "update"]
    assert len(updates) == 108 and all(p["invalid"] for p in updates)
    import numpy as np

    # a forgery is built on the live task: its device's topic, the task's run id, round and tensors
    task = TaskSeen(2, "fit", "0123456789abcdef", {"w": np.ones((2, 3), np.float32)})
    forger = Forger(4, Templates(keys=["w"], dtypes={"w": "float32"}), seed=0)
    built = forger.update({"cat": "update", "target": 1, "invalid": [("kind", "other")], "free": []}, {3: task})
    from protocols.codec import decode

    header, arrays = decode(built.payload)
    assert built.topic == "fedcmd/sim/client/3/update" and built.reaches
    assert (header.client, header.round, header.run, header.kind) == (3, 2, "0123456789abcdef", "evaluate")
    assert np.allclose(arrays["w"], 1.0042)  # the marker: an aggregated forgery would move the model
    # two tensor mutations on an evaluate answer (no tensors expected) must not cancel out (found by the soak)
    ev = TaskSeen(3, "evaluate", "0123456789abcdef", {})
    plan = {"cat": "update", "target": 0, "free": [],
            "invalid": [("tensor", ("int8_no_scale", 4)), ("tensor", ("missing", 0, 39))]}
    _, arrays = decode(Forger(4, Templates(), seed=0).update(plan, {1: ev}).payload)
    assert len(arrays) == 2


def test_every_forgery_is_refused_by_the_coordinator_and_valid_without_its_invalid_mutations() -> None:
    """Offline, against the real Coordinator's checks (memory transport, an open fit or evaluate round): every
    plan that reaches a handler is rejected and counted; the same update plans with their invalid mutations
    left out pass every check (so each forgery is near-valid: refused for what was mutated)."""
    import logging

    from cloud.config import resolve
    from cloud.service.coordinator import Coordinator, RoundSettings
    from cloud.sim.simulate import FLEET, prepare
    from protocols.memory import MemoryTransport

    logging.getLogger("fedcmd.cloud").setLevel(logging.ERROR)  # one warning per reject
    p = prepare(resolve({}, {"algo": "fedavg", "dataset": "digits", "client_num": 5, "global_epoch": 4, "seed": 1}))
    co = Coordinator(MemoryTransport(), p.server, FLEET,
                     RoundSettings(num_clients=5, global_epoch=4, join_ratio=0.6, seed=1, local_epoch=1,
                                   track_presence=True))
    co.online = set(range(5))
    p.server.begin_round(1, [0, 2, 3])

    def open_round(kind: str) -> dict[int, TaskSeen]:
        cids = range(5) if kind == "evaluate" else (0, 2, 3)
        co.current_round, co.asked, co.inbox = 1, {}, {}
        for c in cids:
            co.asked[c] = p.server.task_for(1, c, kind)  # type: ignore[arg-type]
        return {c: TaskSeen(1, kind, co.run_id, co.asked[c].arrays) for c in cids}

    arrays = open_round("fit")[0].arrays
    metrics = {"test_before_correct": 30.0, "test_before_loss": 70.0, "test_before_count": 36.0}
    templates = Templates(keys=sorted(arrays), dtypes={k: str(v.dtype) for k, v in arrays.items()},
                          metrics={"fit": {**metrics, "fit_seconds": 0.2}, "evaluate": metrics},
                          num_samples=dict.fromkeys(range(5), 280))
    forger = Forger(5, templates, seed=0)
    plans = generate_plans(400, 80, seed=5)
    reached = accepted = 0
    for i, plan in enumerate(plans):
        built = build_message(forger, plan, open_round("evaluate" if i % 5 == 0 else "fit"), b"x" * 100)
        reached += built.reaches
        handler = co._on_update if built.topic.endswith("/update") else co._on_presence
        if built.reaches:
            handler(built.topic, built.payload)
        accepted += bool(co.inbox) or co.online != set(range(5))
    assert reached > 400 and accepted == 0
    assert sum(co.rejected.values()) == reached
    assert {"bad_tensors", "bad_metrics", "bad_info", "bad_count", "malformed", "wrong_run"} <= set(co.rejected)
    valid = 0
    updates = [pl for pl in plans if pl["cat"] == "update"]
    for i, plan in enumerate(updates):
        built = forger.update({**plan, "invalid": []}, open_round("evaluate" if i % 5 == 0 else "fit"))
        co._on_update(built.topic, built.payload)
        valid += bool(co.inbox)
    # free variations may be invalid on their own (sign-flipped BN variances, 1e30 in fp16): most are not
    assert valid > 0.8 * len(updates), (valid, len(updates))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    keep = tmp_path_factory.mktemp("bench-hostile")
    rep = run_bench(messages=300, junk=60, clients=3, rounds=2, seed=2, workers=1, timeout=400, keep=keep)
    print(json.dumps({k: v for k, v in rep.items() if k not in ("clean", "hostile")}, indent=1, default=str))
    rep["keep"] = keep
    return rep


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smoke_no_crash_no_forgery_aggregated(smoke: dict) -> None:
    rep = smoke
    assert rep["crashes"] == 0, rep["hostile"]["log_tail"] or rep["clean"]["log_tail"]
    assert rep["clean"]["tracebacks"] == rep["hostile"]["tracebacks"] == 0
    assert rep["structured_sent"] == 300 and rep["sent"]["junk"] == 60
    assert rep["reaching_coordinator"] > 100
    # every forgery that reached a coordinator handler was rejected there and counted by reason (the probe's
    # digests of accepted payloads contain no forgery), none reached an aggregate
    assert rep["unaccounted"] == 0
    assert rep["hostile_aggregated"] == 0 and rep["hostile_accepted_where"] == []
    assert rep["real_updates_accepted"] and rep["real_updates_accepted"] > 0
    reasons = rep["rejected_by_reason"]
    for deep in ("bad_tensors", "wrong_run", "wrong_kind", "bad_presence", "malformed"):
        assert reasons.get(deep, 0) > 0, (deep, reasons)
    assert rep["clean_rejected_by_reason"] == {}
    # rejects are logged, but boundedly: the first five per (reason, device), then every 1000th with its count
    logged = (rep["keep"] / "hostile" / "coordinator.log").read_text().count("rejected message")
    assert 0 < logged <= rep["coordinator_rejects"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smoke_run_equals_the_clean_run(smoke: dict) -> None:
    assert smoke["real_answers_lost"] == {}
    assert smoke["metrics_equal_clean"] and smoke["differing_rounds"] == []
    assert passed(smoke)
