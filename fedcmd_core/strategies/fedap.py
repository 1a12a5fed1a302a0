"""FedAP (Lu et al., IEEE Trans. Big Data 2022, arXiv:2112.00734): after a warm-up, client similarity comes
from the statistics of each device's data at the BatchNorm inputs; bodies are similarity-weighted, BN stays local.

As FL-bench's "original" FedAP: warm-up rounds pass one model from device to device, each training on the
first ``pretrain_ratio`` of its train split (later rounds use the rest); then W_ii = ``model_momentum`` and
W_ij proportional to 1 / sum_layers sqrt(||mu_i - mu_j||^2 + ||sigma_i - sigma_j||^2) of the per-channel BN
input statistics, and device i gets sum_j W_ij theta_j with its BN layers (weights and statistics) local.
Simplified for a sampled fleet: warm-up relays through each round's sampled devices (FL-bench: through all
devices every warm-up round), and a device measures its statistics at its first post-warm-up task, with the
same warmed-up model every device gets then (FL-bench: all devices at once); W covers the devices measured so far.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from torch import nn

from fedcmd_core import kernels
from fedcmd_core.params import Arrays, flatten, unflatten
from fedcmd_core.strategies.base import (
    Algorithm,
    ClientContext,
    ClientStrategy,
    HyperParams,
    NoInfo,
    ServerContext,
    ServerStrategy,
    Task,
    Update,
)
from fedcmd_core.strategies.bodies import BodyStore
from fedcmd_core.strategies.fedbn import bn_keys
from fedcmd_core.strategies.fedfomo import split_train, training_on
from fedcmd_core.strategies.phases import PhaseLength, phase_rounds

Stats = dict[str, dict[str, list[float]]]  # BN module -> {"mean": [...], "var": [...]}


class FedAPParams(HyperParams):
    warmup_round: PhaseLength = Field(0.5, ge=0, description="fraction (< 1) or number of warm-up rounds")
    pretrain_ratio: float = Field(0.3, gt=0, lt=1, description="fraction of the train split used in warm-up")
    model_momentum: float = Field(0.5, ge=0, le=1, description="weight W_ii of a device's own body")


def bn_distance(a: Stats, b: Stats) -> float:
    """FedAP's distance: sum over BN layers of the 2-Wasserstein distance between diagonal Gaussians."""
    total = 0.0
    for name in a:
        m = np.subtract(a[name]["mean"], b[name]["mean"])
        s = np.sqrt(a[name]["var"]) - np.sqrt(b[name]["var"])
        total += math.sqrt(float((m * m).sum() + (s * s).sum()))
    return total


class BNStat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mean: list[float] = Field(max_length=65536)
    var: list[float] = Field(max_length=65536)


class BNStatsInfo(NoInfo):
    """A device's BatchNorm input statistics per BN module (checked against the model in _valid)."""

    bn_stats: dict[Annotated[str, StringConstraints(max_length=256)], BNStat] | None = Field(None, max_length=256)


class FedAPServer(ServerStrategy):
    Info = BNStatsInfo
    state_fields = ("bodies", "stats")

    def __init__(self, params: FedAPParams, ctx: ServerContext) -> None:
        super().__init__(params, ctx)
        self.params: FedAPParams = params
        self.warmup = phase_rounds(params.warmup_round, ctx.global_epoch)
        local = bn_keys(ctx.spec.keys)
        self.body_keys = [k for k in ctx.spec.trainable_keys() if k not in local]
        self.bodies = BodyStore(ctx.body_budget_bytes, ctx.spill_dir, "bodies")
        self.stats: dict[int, Stats] = {}
        # BN module -> channels, to check what devices report (it comes off the wire)
        self.channels = {
            k[: -len(".running_mean")]: v.size for k, v in ctx.spec.initial.items() if k.endswith(".running_mean")
        }
        if not self.channels:
            raise ValueError("fedap: the model has no BatchNorm layer to measure client similarity with")

    def phase(self, rnd: int) -> str:
        return "warmup" if rnd < self.warmup else "personal"

    def sequential(self, rnd: int) -> bool:
        return rnd < self.warmup  # the warm-up model is relayed from device to device

    def shared_keys(self, rnd: int) -> list[str]:
        return self.ctx.spec.keys if rnd < self.warmup else self.body_keys

    def configure_fit(self, rnd: int, cid: int) -> Task:
        keys = self.ctx.spec.keys
        if rnd < self.warmup:
            return Task(rnd, "fit", {k: self.global_arrays[k] for k in keys}, {"upload": keys, "pretrain": True})
        if cid not in self.stats:
            # First task after warm-up: the whole warmed-up model, on which the device measures its statistics.
            cfg = {"upload": self.body_keys, "report_stats": True}
            return Task(rnd, "fit", {k: self.global_arrays[k] for k in keys}, cfg)
        body = unflatten(self._mixed(cid), self.global_arrays, self.body_keys)
        return Task(rnd, "fit", body, {"upload": self.body_keys})

    def configure_evaluate(self, rnd: int, cid: int) -> Task:
        if rnd < self.warmup or cid not in self.stats:
            return Task(rnd, "evaluate", {k: self.global_arrays[k] for k in self.ctx.spec.keys}, {})
        return Task(rnd, "evaluate", unflatten(self._mixed(cid), self.global_arrays, self.body_keys), {})

    def on_update(self, rnd: int, cid: int, update: Update) -> None:
        if rnd < self.warmup:
            self.global_arrays.update(update.arrays)  # the next device in the relay starts from here

    def weight_row(self, cid: int) -> dict[int, float]:
        """W_i over the measured devices: model_momentum on itself, the rest by inverse BN distance."""
        others = [j for j in sorted(self.stats) if j != cid and j in self.bodies]
        if not others:
            return {cid: 1.0}
        inv = np.asarray([bn_distance(self.stats[cid], self.stats[j]) for j in others])
        inv = np.where(inv == 0, 1e14, 1.0 / np.where(inv == 0, 1.0, inv))
        mom = self.params.model_momentum
        row = {j: float(w) for j, w in zip(others, inv / inv.sum() * (1.0 - mom))}
        row[cid] = mom
        return row

    def _mixed(self, cid: int) -> np.ndarray:
        row = self.weight_row(cid)
        ids = list(row)
        weights = np.asarray([[row[j] for j in ids]])
        return kernels.weighted_aggregate(weights, [self.bodies[j] for j in ids])[0]

    def _valid(self, stats: Any) -> bool:
        """Statistics for exactly the model's BN layers, of the right sizes, finite and var >= 0."""
        if not isinstance(stats, dict) or set(stats) != set(self.channels):
            return False
        try:
            for name, n in self.channels.items():
                mean, var = np.asarray(stats[name]["mean"], float), np.asarray(stats[name]["var"], float)
                if mean.shape != (n,) or var.shape != (n,) or not np.isfinite([mean, var]).all() or (var < 0).any():
                    return False
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> dict[str, Any]:
        if rnd >= self.warmup:
            for c, update in updates.items():
                self.bodies[c] = flatten(update.arrays, self.body_keys)
                if self._valid(update.info.get("bn_stats")):
                    self.stats[c] = update.info["bn_stats"]
        return {"measured": len(self.stats)} if rnd >= self.warmup else {}

    def summary(self) -> dict[str, Any]:
        return {"warmup_rounds": self.warmup, "measured_clients": len(self.stats)}


@torch.no_grad()
def bn_input_stats(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> Stats:
    """Per-channel mean and variance of every BatchNorm layer's input over ``x`` (eval mode: nothing changes)."""
    sums: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            t = inputs[0].detach().double()
            dims = [d for d in range(t.dim()) if d != 1]
            zeros = torch.zeros(t.shape[1], dtype=torch.float64)
            acc = sums.setdefault(name, [zeros, zeros.clone(), torch.zeros((), dtype=torch.float64)])
            acc[0] = acc[0] + t.sum(dims).cpu()
            acc[1] = acc[1] + (t * t).sum(dims).cpu()
            acc[2] = acc[2] + t.numel() // t.shape[1]

        return record

    for name, module in model.named_modules():
        if getattr(module, "running_mean", None) is not None:
            handles.append(module.register_forward_pre_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, x.shape[0], batch_size):
            model(x[start : start + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out: Stats = {}
    for name, (s, sq, n) in sums.items():
        mean = s / n
        var = (sq / n - mean * mean).clamp_min(0.0)
        out[name] = {"mean": mean.tolist(), "var": var.tolist()}
    return out


class FedAPClient(ClientStrategy):
    def __init__(self, params: FedAPParams, ctx: ClientContext) -> None:
        super().__init__(params, ctx)
        self.pretrain_index, self.train_index = split_train(ctx, params.pretrain_ratio)
        self.stats: Stats | None = None

    def local_train(self, task: Task, generator: torch.Generator) -> None:
        self.stats = None
        if task.config.get("report_stats"):
            self.stats = bn_input_stats(self.ctx.model, self.ctx.data.x_train)  # before training, on the sent model
        index = self.pretrain_index if task.config.get("pretrain") else self.train_index
        with training_on(self.ctx, index):
            super().local_train(task, generator)

    def upload(self, task: Task, received: Arrays) -> tuple[Arrays, dict[str, Any]]:
        arrays, info = super().upload(task, received)
        if self.stats is not None:
            info["bn_stats"] = self.stats
        return arrays, info


ALGORITHM = Algorithm("fedap", FedAPParams, FedAPServer, FedAPClient)
