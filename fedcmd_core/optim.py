"""The local optimiser and learning-rate scheduler of a device, and their state between rounds.

FL-bench's choices: ``sgd`` (momentum, weight decay), ``adam`` and ``adamw``; a scheduler ``step``
(multiply the rate by ``gamma`` every ``step_size`` local epochs) or ``cosine`` (anneal to ``eta_min``
over ``t_max`` local epochs), stepped once per local epoch as FL-bench's clients do.

A device builds a fresh optimiser every round and keeps what it learned on the device, never on the
wire: every per-parameter state tensor (SGD's momentum buffer, Adam's moments and step count) and the
scheduler's epoch count go into the client's state arrays, under ``momentum::<param>`` (SGD, the name
runs before this module used), ``optim.<key>::<param>`` and ``lr_scheduler::epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from fedcmd_core.lean_sgd import LeanSGD

OptimizerName = Literal["sgd", "adam", "adamw"]
SchedulerName = Literal["none", "step", "cosine"]
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
SCHEDULERS: tuple[str, ...] = ("none", "step", "cosine")
SCHEDULER_KEY = "lr_scheduler::epoch"


@dataclass(frozen=True)
class OptimSettings:
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_scheduler: str = "none"
    step_size: int = 10
    gamma: float = 0.1
    t_max: int = 10
    eta_min: float = 0.0


def make_optimizer(params: list[nn.Parameter], s: OptimSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":  # torch.optim.SGD's exact steps without its torch._dynamo import (lean_sgd.py)
        return LeanSGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    raise ValueError(f"unknown optimizer {s.optimizer!r} (known: {', '.join(OPTIMIZERS)})")


def scheduled_lr(s: OptimSettings, epoch: int) -> float:
    """The rate of local epoch ``epoch`` (0 = the device's first), closed form as torch's StepLR/CosineAnnealingLR."""
    if s.lr_scheduler == "step":
        return s.lr * s.gamma ** (epoch // s.step_size)
    if s.lr_scheduler == "cosine":
        # torch's closed form; past t_max it comes back up, as torch's does
        return s.eta_min + (s.lr - s.eta_min) * (1 + math.cos(math.pi * epoch / s.t_max)) / 2
    return s.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _key(state_key: str, name: str) -> str:
    return f"momentum::{name}" if state_key == "momentum_buffer" else f"optim.{state_key}::{name}"


def load_state(
    optimizer: torch.optim.Optimizer, named: Iterable[tuple[str, nn.Parameter]], state: Mapping[str, np.ndarray]
) -> None:
    """Put the state saved by :func:`save_state` back into a fresh ``optimizer`` for these parameters."""
    for name, p in named:
        found = {}
        for k in _state_keys(optimizer):
            buf = state.get(_key(k, name))
            if buf is not None:
                found[k] = torch.from_numpy(np.array(buf, copy=True))
        if found:
            optimizer.state[p].update(found)


def save_state(
    optimizer: torch.optim.Optimizer, named: Iterable[tuple[str, nn.Parameter]], state: MutableMapping[str, np.ndarray]
) -> None:
    for name, p in named:
        for k, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                state[_key(k, name)] = v.detach().cpu().numpy().copy()


def _state_keys(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    if isinstance(optimizer, torch.optim.SGD):
        return ("momentum_buffer",)
    return ("step", "exp_avg", "exp_avg_sq")


def keeps_state(s: OptimSettings) -> bool:
    """Whether the optimiser has state worth carrying to the next round (plain SGD has none)."""
    return s.optimizer != "sgd" or s.momentum != 0


def scheduler_epoch(state: Mapping[str, np.ndarray]) -> int:
    value = state.get(SCHEDULER_KEY)
    return 0 if value is None else int(np.asarray(value).reshape(-1)[0])


def set_scheduler_epoch(state: MutableMapping[str, np.ndarray], epoch: int) -> None:
    state[SCHEDULER_KEY] = np.array([epoch], dtype=np.int64)
