"""Strategy behaviour checked on real (small) simulations and on the server side directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cloud.config import resolve
from cloud.sim.simulate import SimulationResult, build_and_run
from fedcmd_core.models import build_model, is_bn_statistic
from fedcmd_core.params import flatten
from fedcmd_core.selection import layer_distances, mode, round_mode
from fedcmd_core.strategies import ModelSpec, ServerContext, Update, algorithm, parse_params
from fedcmd_core.strategies.fedcmd import DELTA, FedCMDServer
from protocols.codec import decode
from protocols.memory import MemoryTransport


def small_run(algo: str, partition: Path, rounds: int = 6, **hp: object) -> tuple[SimulationResult, list]:
    """A real simulation on the first shared partition; returns every decoded message too."""
    transport = MemoryTransport()
    messages: list = []
    for kind in ("task", "update"):  # every framed message (presence and status are JSON)
        transport.subscribe(
            f"fedcmd/+/client/+/{kind}", lambda topic, payload: messages.append((topic, *decode(payload)))
        )
    cfg = resolve(
        {},
        {
            "algo": algo, "dataset": "mnist5k", "partition": partition, "join_ratio": 0.1,
            "global_epoch": rounds, "local_epoch": 1, "seed": 3, "test_gap": 0, "hp": dict(hp),
        },
    )
    return build_and_run(cfg, transport=transport), messages


def test_fedcmd_personal_layer_and_bn_statistics_never_leave_the_device(shared_partition: Path) -> None:
    res, messages = small_run("fedcmd", shared_partition, rounds=6, selection_rounds=3)
    chosen = res.strategy_summary["chosen_layer"]
    assert chosen in ("fc1", "fc2", "classifier")
    assert sum(res.strategy_summary["vote_counts"].values()) > 0
    assert len(res.strategy_summary["round_layers"]) == 3
    phase2 = [(t, h, a) for t, h, a in messages if h.round >= 3]
    assert phase2
    for topic, header, arrays in phase2:
        for key in arrays:
            assert not is_bn_statistic(key), f"{key} left in {topic}"
            if header.type == "update" and key.startswith(chosen + "."):
                pytest.fail(f"personal layer {key} uploaded in {topic}")
        if header.type == "update" and header.kind == "fit":
            deltas = [k for k in arrays if k.startswith(DELTA)]
            assert deltas and all(k[len(DELTA) :].startswith(chosen + ".") for k in deltas)
    # first-contact tasks carry the cloud's model so a device starts from it; later ones only the body
    later = [a for t, h, a in phase2 if h.type == "task" and h.kind == "fit" and h.round >= 4]
    assert any(not any(k.startswith(chosen + ".") for k in a) for a in later)


def test_relay_passes_the_body_from_device_to_device(shared_partition: Path) -> None:
    _, messages = small_run("fedcmd", shared_partition, rounds=4, selection_rounds=2, body_mode="relay")
    rnd = 3
    fits = [(h, a) for _, h, a in messages if h.round == rnd and h.kind == "fit"]
    order = [h.client for h, _ in fits if h.type == "task"]
    tasks = {h.client: a for h, a in fits if h.type == "task"}
    updates = {h.client: a for h, a in fits if h.type == "update"}
    assert len(order) >= 2
    # messages are seen in sending order: task(c0), update(c0), task(c1), ...
    sequence = [(h.type, h.client) for h, _ in fits]
    assert sequence[:4] == [("task", order[0]), ("update", order[0]), ("task", order[1]), ("update", order[1])]
    for prev, nxt in zip(order, order[1:]):
        for key, value in updates[prev].items():
            if not key.startswith(DELTA) and key in tasks[nxt]:
                np.testing.assert_array_equal(tasks[nxt][key], value)


def _server(algo: str, num_clients: int = 4, rounds: int = 10, **hp: object):
    model = build_model("lenet5", (1, 28, 28), 10, seed=0)
    spec = ModelSpec.from_model(model)
    server_cls, _ = algorithm(algo)
    return server_cls(parse_params(algo, hp), ServerContext(spec, num_clients, rounds, 0)), spec


def _fake_update(spec: ModelSpec, keys: list[str], rng: np.random.Generator, n: int, **extra) -> Update:
    arrays = {k: (spec.initial[k] + rng.normal(size=spec.initial[k].shape)).astype(np.float32) for k in keys}
    arrays.update(extra)
    return Update(0, arrays, n, {}, {})


def test_fedavg_is_the_sample_weighted_mean() -> None:
    server, spec = _server("fedavg")
    rng = np.random.default_rng(0)
    keys = spec.keys
    ups = {c: _fake_update(spec, [k for k in keys if "num_batches" not in k], rng, n) for c, n in [(0, 10), (2, 30)]}
    for c, u in ups.items():
        u.arrays.update({k: spec.initial[k] for k in keys if "num_batches" in k})
        server.on_update(0, c, u)
    server.aggregate(0, ups)
    k = "fc2.0.weight"
    expected = (10 * ups[0].arrays[k] + 30 * ups[2].arrays[k]) / 40
    np.testing.assert_allclose(server.global_arrays[k], expected, rtol=1e-5, atol=1e-6)


def test_fedcmd_described_variant_mixes_every_stored_body_as_the_paper_defines() -> None:
    tau = 0.5
    server, spec = _server("fedcmd", num_clients=3, rounds=4, selection_rounds=1, tau=tau, variant="described")
    assert isinstance(server, FedCMDServer)
    assert (server.params.max_staleness, server.params.server_lr) == (0, 1.0)
    rng = np.random.default_rng(1)
    trainable = spec.trainable_keys()
    server.begin_round(0, [0, 1, 2])
    updates = {}
    for c in range(3):
        server.task_for(0, c)  # the device's first contact happens in phase 1
        u = _fake_update(spec, trainable, rng, 10 + c)
        u.info = {"votes": {"fc2": 5, "fc1": 1}}
        updates[c] = u
        server.on_update(0, c, u)
    sent = {k: v.copy() for k, v in server.global_arrays.items()}
    server.aggregate(0, updates)
    server.begin_round(1, [0])
    assert server.vote.chosen == "fc2"
    body_keys = [k for k in trainable if not k.startswith("fc2.")]
    assert server.body_keys == body_keys
    # s_ij from the phase-1 updates of fc2 (weight rows with the bias appended)
    def head(c: int) -> np.ndarray:
        w = updates[c].arrays["fc2.0.weight"] - sent["fc2.0.weight"]
        b = updates[c].arrays["fc2.0.bias"] - sent["fc2.0.bias"]
        return np.concatenate([w, b[:, None]], axis=1).astype(np.float64)

    def s(i: int, j: int) -> float:
        a, b = head(i), head(j)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        return max(0.0, float(cos.mean()))

    phi = np.array([np.exp(s(0, j) / tau) for j in range(3)])
    bodies = [flatten(updates[j].arrays, body_keys) for j in range(3)]
    expected = sum(p * b for p, b in zip(phi, bodies)) / phi.sum()
    task = server.task_for(1, 0)
    np.testing.assert_allclose(flatten(task.arrays, body_keys), expected, rtol=1e-5, atol=1e-6)
    assert not any(k.startswith("fc2.") for k in task.arrays)
    # stored bodies are detached copies: changing what the device sent changes nothing
    before = server.bodies[1].copy()
    updates[1].arrays["conv1.0.weight"][...] = 1e6
    np.testing.assert_array_equal(server.bodies[1], before)


def _head_rows(delta: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([delta["fc2.0.weight"], delta["fc2.0.bias"][:, None]], axis=1).astype(np.float64)


def _similarity(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return max(0.0, float(cos.mean()))


def _phase2_round(server, spec, rnd: int, cids: list[int], rng: np.random.Generator) -> dict[int, tuple]:
    """Devices train from the bodies the cloud sends; returns {cid: (start, trained, personal update)}."""
    server.begin_round(rnd, cids)
    out, ups = {}, {}
    for c in cids:
        task = server.task_for(rnd, c)
        start = flatten(task.arrays, server.body_keys)
        arrays = {k: (task.arrays[k] + 0.1 * rng.normal(size=task.arrays[k].shape)).astype(np.float32)
                  for k in server.body_keys}
        delta = {k: rng.normal(size=spec.initial[k].shape).astype(np.float32) for k in server.personal_keys}
        arrays.update({DELTA + k: v for k, v in delta.items()})
        ups[c] = Update(rnd, arrays, 10 + c, {}, {})
        server.on_update(rnd, c, ups[c])
        out[c] = (start, flatten(arrays, server.body_keys), delta)
    server.aggregate(rnd, ups)
    return out


def test_fedcmd_default_mixes_last_rounds_bodies_and_steps_along_their_update() -> None:
    """The default (docs/RESEARCH.md, issue 11): only bodies from the last round, similarity-weighted,
    plus (server_lr - 1) times the weighted mean of their updates theta_j - start_j."""
    assert parse_params("fedcmd", {}) == parse_params(
        "fedcmd", {"max_staleness": 1, "server_lr": 8.0, "server_momentum": 0.3}
    )
    # the step by hand, without the momentum term (its own test below)
    server, spec = _server("fedcmd", num_clients=4, rounds=6, selection_rounds=1, server_momentum=0.0)
    rng = np.random.default_rng(2)
    trainable = spec.trainable_keys()
    server.begin_round(0, [0, 1, 2, 3])
    phase1, ups = {}, {}
    for c in range(4):
        server.task_for(0, c)
        u = _fake_update(spec, trainable, rng, 10 + c)
        u.info = {"votes": {"fc2": 3}}
        phase1[c] = {k: u.arrays[k] - spec.initial[k] for k in ("fc2.0.weight", "fc2.0.bias")}
        server.on_update(0, c, u)
        ups[c] = u
    server.aggregate(0, ups)
    trained = _phase2_round(server, spec, 1, [0, 1], rng)  # clients 2 and 3 hold round-0 (stale) bodies
    server.begin_round(2, [2])
    got = flatten(server.task_for(2, 2).arrays, server.body_keys)
    phi = np.array([np.exp(_similarity(_head_rows(phase1[2]), _head_rows(trained[j][2]))) for j in (0, 1)])
    phi = phi / phi.sum()
    mixed = sum(w * trained[j][1] for w, j in zip(phi, (0, 1)))
    step = sum(w * (trained[j][1] - trained[j][0]) for w, j in zip(phi, (0, 1)))
    np.testing.assert_allclose(got, mixed + 7.0 * step, rtol=1e-4, atol=1e-5)
    # the described form would have mixed all four bodies without the step: a different body
    assert not np.allclose(got, mixed)
    # the round's mixing diagnostics come back with the round: fresh bodies only, two of them
    facts = server.aggregate(2, {})
    assert facts["staleness"] == pytest.approx(1.0) and facts["mixed_bodies"] == 2.0
    assert facts["effective_bodies"] == pytest.approx(1.0 / (phi**2).sum())


def test_fedcmd_server_momentum_adds_the_previous_rounds_velocity() -> None:
    """server_momentum=beta: bodies of round t+1 get server_lr * beta * v_(t-1) on top of the default body,
    v_t = beta v_(t-1) + mean_j (theta_j - start_j) over round t's devices (FedAvgM)."""
    beta, lr = 0.5, 8.0
    server, spec = _server("fedcmd", num_clients=4, rounds=8, selection_rounds=1, server_momentum=beta)
    rng = np.random.default_rng(3)
    server.begin_round(0, [0, 1, 2, 3])
    ups = {}
    for c in range(4):
        server.task_for(0, c)
        u = _fake_update(spec, spec.trainable_keys(), rng, 10)
        u.info = {"votes": {"fc2": 3}}
        server.on_update(0, c, u)
        ups[c] = u
    server.aggregate(0, ups)
    first = _phase2_round(server, spec, 1, [0, 1], rng)
    v1 = np.mean([first[c][1] - first[c][0] for c in (0, 1)], axis=0)
    second = _phase2_round(server, spec, 2, [2, 3], rng)
    server.begin_round(3, [0])
    got = flatten(server.task_for(3, 0).arrays, server.body_keys)
    phi = np.array([np.exp(_similarity(_head_rows(first[0][2]), _head_rows(second[j][2]))) for j in (2, 3)])
    phi = phi / phi.sum()
    mixed = sum(w * second[j][1] for w, j in zip(phi, (2, 3)))
    step = sum(w * (second[j][1] - second[j][0]) for w, j in zip(phi, (2, 3)))
    np.testing.assert_allclose(got, mixed + (lr - 1) * step + lr * beta * v1, rtol=1e-4, atol=1e-5)
    v2 = np.mean([second[c][1] - second[c][0] for c in (2, 3)], axis=0)
    np.testing.assert_allclose(server.velocity, beta * v1 + v2, rtol=1e-5, atol=1e-6)


def test_fedcmd_described_variant_cannot_be_given_other_knobs() -> None:
    assert parse_params("fedcmd", {"variant": "described", "server_lr": 1}).max_staleness == 0
    with pytest.raises(ValueError, match="variant=described"):
        parse_params("fedcmd", {"variant": "described", "server_lr": 8})
    with pytest.raises(ValueError):
        parse_params("fedcmd", {"variant": "fresh"})


def test_vote_tallies_break_ties_towards_the_output() -> None:
    order = ["fc1", "fc2", "classifier"]
    assert mode({"fc1": 3, "fc2": 3}, order) == "fc2"
    assert mode({"fc1": 4, "classifier": 3}, order) == "fc1"
    assert mode({}, order) is None
    assert round_mode([{"fc1": 5, "fc2": 1}, {"fc2": 2}, {"fc1": 3}], order) == "fc1"
    assert round_mode([{"fc1": 1, "classifier": 1}], order) == "classifier"


def test_w1_layer_distance_equals_scipy_on_the_embeddings() -> None:
    from scipy.stats import wasserstein_distance

    from fedcmd_core.selection import embed

    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 4, 4, generator=g)
    y = torch.nn.functional.one_hot(torch.arange(16) % 3, 3).float()
    outs = [torch.rand(16, 8, generator=g), torch.rand(16, 5, generator=g), torch.rand(16, 3, generator=g)]
    d = layer_distances(x, y, outs, [1, 2], "w1")
    z = [embed(x), *[embed(o) for o in outs]]
    target = (embed(y) - z[0]).numpy()
    for pos, i in enumerate([1, 2]):
        assert d[pos] == pytest.approx(wasserstein_distance((z[i + 1] - z[i]).numpy(), target), abs=1e-12)
    g2 = layer_distances(x, y, outs, [0, 1, 2], "gaussian_w2")
    ref = layer_distances(x, y, outs, [0, 1, 2], "reference")
    assert g2.shape == ref.shape == (3,) and np.all(g2 >= 0) and np.all(ref >= 0)


def test_local_only_sends_nothing_and_pfedsim_keeps_the_classifier(shared_partition: Path) -> None:
    _, messages = small_run("local", shared_partition, rounds=2)
    assert all(not a for _, h, a in messages if h.type in ("task", "update"))
    _, messages = small_run("pfedsim", shared_partition, rounds=4, warmup_round=2)
    late = [a for _, h, a in messages if h.type == "task" and h.round >= 3 and h.kind == "fit"]
    assert any(not any(k.startswith("classifier.") for k in a) for a in late)


def test_bad_hyper_parameters_are_rejected() -> None:
    with pytest.raises(ValueError):
        parse_params("fedcmd", {"body_mode": "serial"})
    with pytest.raises(ValueError):
        parse_params("fedcmd", {"tau": 0})
    with pytest.raises(ValueError):
        parse_params("fedavg", {"nonsense": 1})
