"""Malicious simulated devices (``fedcmd simulate --attackers K --attack ...``), so that the effect of
norm clipping and robust aggregation can be measured.

An attacker trains honestly, then replaces the float arrays of its update. With ``sent`` the array the
task carried (zero for keys the task did not carry, e.g. FedCMD's ``delta::`` personal updates),
``trained`` the honest result, ``d = trained - sent`` and ``s`` the attack scale:

- ``scale``:    sent + s * d         (a boosted update; s = 1e6 by default)
- ``signflip``: sent - s * d         (gradient ascent, boosted)
- ``noise``:    sent + N(0, (s * rms(d))^2) per entry   (noise s times the honest update's size)
- ``nan``:      NaN everywhere       (the coordinator must reject it as non-finite)

Integer arrays, BatchNorm running statistics, sample counts and metrics are left honest: the attack is on
the parameters (a scaled running variance goes negative, which the coordinator rejects outright). Which
devices attack is drawn from the run seed, on a stream of its own (the round sampling is unchanged).
"""

from __future__ import annotations

import dataclasses
from typing import Any, get_args

import numpy as np

from cloud.config import AttackName
from fedcmd_core.models import is_bn_statistic
from fedcmd_core.strategies import ClientStrategy, Task, Update

ATTACKS: tuple[str, ...] = get_args(AttackName)
_STREAM = 0xA77AC  # separates the attackers' random stream from the run's other streams


def pick_attackers(num_clients: int, count: int, seed: int) -> list[int]:
    """The ``count`` malicious device ids of a run: the same for the same seed, wherever it runs."""
    if not 0 <= count <= num_clients:
        raise ValueError(f"attackers must be between 0 and the {num_clients} devices, got {count}")
    rng = np.random.default_rng([seed, _STREAM])
    return sorted(int(c) for c in rng.choice(num_clients, count, replace=False))


def poison(
    arrays: dict[str, np.ndarray],
    sent: dict[str, np.ndarray],
    attack: str,
    scale: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The attacked copy of an update's ``arrays`` (see the module docstring); inputs are not modified."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
    out: dict[str, np.ndarray] = {}
    for key, trained in arrays.items():
        if not np.issubdtype(trained.dtype, np.floating) or is_bn_statistic(key):
            out[key] = trained
            continue
        ref = sent.get(key)
        base = ref.astype(np.float64) if ref is not None and ref.shape == trained.shape else 0.0
        delta = trained.astype(np.float64) - base
        if attack == "scale":
            bad = base + scale * delta
        elif attack == "signflip":
            bad = base - scale * delta
        elif attack == "noise":
            rms = float(np.sqrt(np.mean(delta**2))) if delta.size else 0.0
            bad = base + rng.normal(0.0, scale * rms, size=trained.shape)
        else:
            bad = np.full(trained.shape, np.nan)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is part of the attack
            out[key] = np.asarray(bad).astype(trained.dtype)
    return out


class MaliciousClient:
    """A device strategy that trains honestly and sends a poisoned update.

    Duck-typed: an Agent calls ``fit``, ``evaluate``, ``state_dict`` and ``load_state_dict``; every other
    attribute is the honest strategy's (so its personal state and exports stay the honest ones).
    """

    def __init__(self, inner: ClientStrategy, attack: str, scale: float, seed: int) -> None:
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
        self.inner = inner
        self.attack = attack
        self.scale = scale
        self.seed = seed
        self.poisoned = 0  # updates sent poisoned (tests check the fault landed)

    def fit(self, task: Task) -> Update:
        sent = {k: np.array(v, copy=True) for k, v in task.arrays.items()}  # the strategy may load in place
        update = self.inner.fit(task)
        # One noise stream per (seed, round, client): a resumed or repeated run attacks identically.
        rng = np.random.default_rng([self.seed, _STREAM, task.round, self.inner.ctx.client_id])
        self.poisoned += 1
        return dataclasses.replace(update, arrays=poison(update.arrays, sent, self.attack, self.scale, rng))

    def evaluate(self, task: Task) -> Update:
        return self.inner.evaluate(task)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)
