"""The per-client body store keeps bodies in memory up to its budget and the rest in memory-mapped files;
what a strategy reads back is the same bit for bit, with or without a budget, and checkpoints carry it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedcmd_core.models import build_model
from fedcmd_core.state_tree import load_state_file, save_state_file
from fedcmd_core.strategies import ModelSpec, ServerContext, Update, algorithm, parse_params
from fedcmd_core.strategies.bodies import BodyStore
from fedcmd_core.strategies.fedcmd import DELTA


def test_a_budget_spills_the_oldest_bodies_to_files_and_reads_them_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    bodies = {c: rng.normal(size=1000).astype(np.float32) for c in range(10)}  # 4 kB each
    store = BodyStore(budget_bytes=10_000, spill_dir=tmp_path)
    for c, b in bodies.items():
        store[c] = b
    assert store.memory_bytes <= 10_000 and store.spilled == 8 and len(store) == 10
    assert sorted(int(p.name.split("-")[0]) for p in tmp_path.rglob("*.npy")) == list(range(8))
    for c, b in bodies.items():
        np.testing.assert_array_equal(store[c], b)
    assert isinstance(store[0], np.memmap) and not store[0].flags.writeable  # spilled: read-only map
    assert not isinstance(store[9], np.memmap)
    store[0] = np.zeros(1000, np.float32)  # a new body for a spilled client: its file goes
    assert not list(tmp_path.rglob("0-*.npy")) and store[0].sum() == 0
    del store[1]
    assert 1 not in store and len(store) == 9
    state = store.to_state()
    assert sorted(state) == list(store) and all(type(v) is np.ndarray for v in state.values())
    again = BodyStore()
    again.load_state(state)
    assert again == store and again.spilled == 0
    store.close()
    assert len(store) == 0 and list(tmp_path.rglob("*.npy")) == []


def test_a_deep_copy_is_a_snapshot_that_outlives_changes_to_the_original(tmp_path: Path) -> None:
    import copy

    store = BodyStore(budget_bytes=8_000, spill_dir=tmp_path)
    for c in range(6):
        store[c] = np.full(1000, c, np.float32)
    snap = copy.deepcopy(store)
    assert snap.memory_bytes == store.memory_bytes and snap == store
    store[0] = np.full(1000, -1, np.float32)  # spilled client overwritten: its old file is unlinked
    store[5] = np.full(1000, -5, np.float32)  # in-memory client overwritten
    store.close()  # the original gone entirely (as after the coordinator restores a snapshot)
    assert [float(snap[c][0]) for c in range(6)] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    before = snap.spilled
    snap[6] = np.full(1000, 6, np.float32)  # the snapshot spills on into the same folder
    snap[7] = np.full(1000, 7, np.float32)
    assert snap.spilled == before + 2 and float(snap[6][0]) == 6.0 and float(snap[7][0]) == 7.0
    assert len(list(tmp_path.rglob("*.npy"))) == len(snap._owned) == 2  # only the snapshot's own files left
    snap.close()
    assert list(tmp_path.rglob("*.npy")) == []


def test_no_budget_keeps_everything_in_memory(tmp_path: Path) -> None:
    store = BodyStore(spill_dir=tmp_path)
    for c in range(50):
        store[c] = np.ones(10_000, np.float32)
    assert store.spilled == 0 and store.memory_bytes == 50 * 40_000 and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="budget_bytes"):
        BodyStore(-1)


def _fedcmd(budget: int, spill: Path | None):
    spec = ModelSpec.from_model(build_model("lenet5", (1, 28, 28), 10, seed=0))
    server_cls, _ = algorithm("fedcmd")
    ctx = ServerContext(spec, 12, 10, 0, body_budget_bytes=budget, spill_dir=spill)
    return server_cls(parse_params("fedcmd", {"selection_rounds": 1}), ctx), spec


def _rounds(server, spec: ModelSpec, rounds: int) -> list[np.ndarray]:
    """Drive the server with the same fake devices; returns every body it sent."""
    rng = np.random.default_rng(7)
    sent = []
    for rnd in range(rounds):
        cids = sorted(rng.choice(12, size=4, replace=False).tolist())
        server.begin_round(rnd, cids)
        updates = {}
        for c in cids:
            task = server.task_for(rnd, c)
            sent.append(np.concatenate([np.ravel(task.arrays[k]) for k in sorted(task.arrays)]))
            arrays = {}
            for k in server.expected_upload(task):
                base = spec.initial[k[len(DELTA):] if k.startswith(DELTA) else k]
                start = task.arrays.get(k, base)
                arrays[k] = (start + 0.05 * rng.normal(size=base.shape)).astype(base.dtype)
            updates[c] = Update(rnd, arrays, 10 + c, {}, {"votes": {"fc2": 2}})
            server.on_update(rnd, c, updates[c])
        server.aggregate(rnd, updates)
    return sent


def test_fedcmd_with_a_small_budget_sends_exactly_the_bodies_it_sends_without(tmp_path: Path) -> None:
    free, spec = _fedcmd(0, None)
    tight, _ = _fedcmd(600_000, tmp_path)  # about two LeNet-5 bodies per store in memory
    a, b = _rounds(free, spec, 6), _rounds(tight, spec, 6)
    assert tight.bodies.spilled > 0 and tight.sent.spilled > 0, "the budget never spilled: the test tests nothing"
    assert tight.bodies.memory_bytes <= 300_000 and len(tight.bodies) == len(free.bodies) >= 8
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # a checkpoint of the spilled store holds every body; loaded into an unbudgeted server it goes on alike
    save_state_file(tmp_path / "c.safetensors", {"strategy": tight.state_dict()})
    values, _ = load_state_file(tmp_path / "c.safetensors")
    resumed, _ = _fedcmd(0, None)
    resumed.load_state_dict(values["strategy"])
    assert resumed.bodies == free.bodies and resumed.sent == free.sent
