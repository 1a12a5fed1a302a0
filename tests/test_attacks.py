"""`fedcmd simulate --attackers K --attack ...`: malicious devices really send poisoned updates, the same
devices for the same seed, and the coordinator survives them (non-finite rejected, huge ones clipped)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cloud.cli.main import app
from cloud.config import resolve
from cloud.sim.attacks import MaliciousClient, pick_attackers, poison
from cloud.sim.simulate import build_and_run
from fedcmd_core.runspec import RunSpec, build_client
from fedcmd_core.strategies import ClientData, Task

TINY = {"algo": "fedavg", "dataset": "synthetic", "model": "2nn", "client_num": 6, "join_ratio": 1.0,
        "global_epoch": 2, "local_epoch": 1, "test_gap": 0}


def test_poison_definitions() -> None:
    rng = np.random.default_rng(0)
    sent = {"w": np.full((4, 5), 2.0, np.float32), "n": np.array(3, np.int64)}
    trained = {"w": sent["w"] + np.float32(0.5), "n": np.array(4, np.int64), "delta::w": np.full(3, 0.25, np.float32)}
    scaled = poison(trained, sent, "scale", 10.0, rng)
    np.testing.assert_allclose(scaled["w"], 2.0 + 10 * 0.5)
    np.testing.assert_allclose(scaled["delta::w"], 10 * 0.25)  # not in the task: relative to zero
    assert scaled["w"].dtype == np.float32 and scaled["n"] is trained["n"]  # integers stay honest
    np.testing.assert_allclose(poison(trained, sent, "signflip", 10.0, rng)["w"], 2.0 - 10 * 0.5)
    assert np.isnan(poison(trained, sent, "nan", 1.0, rng)["w"]).all()
    big = {"w": np.zeros(20_000, np.float32)}
    noisy = poison({"w": big["w"] + np.float32(0.1)}, big, "noise", 100.0, rng)["w"]
    assert abs(float(noisy.std()) - 100 * 0.1) < 0.5  # N(0, (s * rms(d))^2)
    assert (trained["w"] == 2.5).all() and (sent["w"] == 2.0).all()  # inputs untouched
    with pytest.raises(ValueError, match="unknown attack"):
        poison(trained, sent, "flood", 1.0, rng)


def test_attackers_are_chosen_by_the_seed() -> None:
    a = pick_attackers(50, 5, seed=42)
    assert a == pick_attackers(50, 5, seed=42) and len(set(a)) == 5 and all(0 <= c < 50 for c in a)
    assert a != pick_attackers(50, 5, seed=43)
    assert pick_attackers(50, 0, seed=42) == [] and pick_attackers(4, 4, seed=1) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        pick_attackers(4, 5, seed=1)


def _client(spec: RunSpec, cid: int):
    gen = torch.Generator().manual_seed(cid)
    x, y = torch.randn(24, 6, generator=gen), torch.randint(0, 3, (24,), generator=gen)
    return build_client(spec, cid, ClientData(x[:16], y[:16], x[16:], y[16:]))


def test_the_wrapper_poisons_what_an_honest_twin_would_send() -> None:
    spec = RunSpec(algo="fedavg", model="2nn", input_shape=(6,), num_classes=3, num_clients=2, global_epoch=2,
                   local_epoch=1)
    honest, evil = _client(spec, 1), MaliciousClient(_client(spec, 1), "scale", 1e6, seed=spec.seed)
    sent = {k: v.copy() for k, v in honest.ctx.spec.initial.items()}
    task = Task(0, "fit", {k: v.copy() for k, v in sent.items()}, {"upload": list(sent)})
    good = honest.fit(task)
    bad = evil.fit(Task(0, "fit", {k: v.copy() for k, v in sent.items()}, {"upload": list(sent)}))
    assert evil.poisoned == 1 and bad.num_samples == good.num_samples and bad.metrics.keys() == good.metrics.keys()
    changed = 0
    for key, value in good.arrays.items():
        if np.issubdtype(value.dtype, np.floating):
            expected = (sent[key].astype(np.float64) + 1e6 * (value.astype(np.float64) - sent[key])).astype(value.dtype)
            np.testing.assert_array_equal(bad.arrays[key], expected)
            changed += int(not np.array_equal(bad.arrays[key], value))
    assert changed > 0, "the attack did not change the update"
    # the device's own state stays the honest one (its personal layers, BN statistics, exports)
    assert evil.state_dict().keys() == honest.state_dict().keys()
    for key, value in honest.state.items():
        np.testing.assert_array_equal(evil.inner.state[key], value)
    assert evil.ctx is evil.inner.ctx  # everything else is the honest strategy's


def test_a_nan_attack_run_finishes_with_the_attackers_rejected(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "simulate", "--algo", "fedavg", "-d", "synthetic", "-m", "2nn", "-cn", "6", "-jr", "1.0", "-ge", "2",
        "-le", "1", "-tg", "0", "--quiet", "--attackers", "2", "--attack", "nan", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    expected = pick_attackers(6, 2, seed=42)
    assert summary["attackers"] == {"devices": expected, "attack": "nan", "scale": 1e6}
    assert summary["rejected_updates"]["non_finite"] == 2 * 2  # two attackers, two rounds, every device sampled
    assert summary["final_personalized_acc"] is not None
    assert f"devices {expected}" in (out / "run.log").read_text()


def test_scaled_updates_are_clipped_and_clipping_is_what_saves_the_run() -> None:
    def acc(**extra: object) -> tuple[float, int]:
        r = build_and_run(resolve({}, {**TINY, "seed": 3, **extra}))
        if extra.get("attackers"):
            assert r.attackers == pick_attackers(6, 1, seed=3)
        return r.records[-1].metrics["test_before_acc"], r.clipped

    clean, _ = acc()
    clipped, n_clipped = acc(attackers=1, attack="scale")
    unclipped, n_unclipped = acc(attackers=1, attack="scale", clip_factor=0.0)
    median, _ = acc(attackers=1, attack="scale", clip_factor=0.0, aggregation="median")
    assert n_clipped >= 1 and n_unclipped == 0
    # the 1e6-scaled update ruins the plain mean (measured: 5.4 % against 53.9 % clean) ...
    assert unclipped < clean - 20
    # ... norm clipping (on by default) and the coordinate-wise median hold it off
    assert abs(clipped - clean) <= 2
    assert median > unclipped + 10
