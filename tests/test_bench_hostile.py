"""``fedcmd bench hostile`` in small: a real coordinator and agents over mosquitto while a hostile client
sends hypothesis-drawn forgeries on the devices' own topics. Nothing crashes, every forgery that reached the
coordinator is counted as a reject, none gets into an aggregate (the run equals the clean run, bit for bit)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("paho.mqtt")
pytest.importorskip("hypothesis")

from cloud.bench_hostile import Forger, TaskSeen, Templates, generate_plans, passed, run_bench
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


@pytest.mark.timeout(600)
def test_smoke_no_crash_no_forgery_aggregated(tmp_path) -> None:
    rep = run_bench(messages=300, junk=60, clients=3, rounds=2, seed=2, workers=1, timeout=400, keep=tmp_path)
    print(json.dumps({k: v for k, v in rep.items() if k not in ("clean", "hostile")}, indent=1, default=str))
    assert rep["crashes"] == 0, rep["hostile"]["log_tail"] or rep["clean"]["log_tail"]
    assert rep["clean"]["tracebacks"] == rep["hostile"]["tracebacks"] == 0
    assert rep["structured_sent"] == 300 and rep["sent"]["junk"] == 60
    # every forgery that reached a coordinator handler was rejected there, and counted by reason
    assert rep["reaching_coordinator"] > 250
    assert rep["coordinator_rejects"] == rep["reaching_coordinator"]
    assert rep["unaccounted"] == 0
    reasons = rep["rejected_by_reason"]
    # forgeries got past the routing checks (they answered the device's open task) and were refused deeper
    for deep in ("bad_tensors", "bad_metrics", "bad_info", "bad_count", "wrong_run", "bad_presence"):
        assert reasons.get(deep, 0) > 0, (deep, reasons)
    assert rep["clean_rejected_by_reason"] == {}
    assert rep["metrics_equal_clean"] and rep["differing_rounds"] == []
    assert rep["hostile_aggregated"] == 0
    assert passed(rep)
    assert (tmp_path / "hostile" / "coordinator.log").read_text().count("rejected") >= rep["coordinator_rejects"]
