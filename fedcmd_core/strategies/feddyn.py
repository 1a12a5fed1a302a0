"""FedDyn (Acar et al., ICLR 2021, arXiv:2111.04263): each device minimises L_k(w) - <g_k, w> +
alpha/2 ||w - w_global||^2 with its own linear term g_k; the cloud corrects the mean by its state h.

Follows the paper's Algorithm 1: g_k <- g_k - alpha (w_k - w_global) is kept on the device (in
``ClientStrategy.state``, so it persists like the model); h <- h - alpha/m sum_k (w_k - w_global) over the
round's clients (m = all clients) and w_global = mean_k w_k - h / alpha (uniform mean, as the paper).
FL-bench (and the FedCMD fork) keep g_k on the server, index it by position in the round and clip
gradients at norm 10; we follow the paper and do not clip (``loss_term`` cannot clip).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from fedcmd_core.params import flatten, model_arrays, unflatten
from fedcmd_core.strategies.base import Algorithm, ClientContext, ClientStrategy, ServerContext, Task, Update
from fedcmd_core.strategies.fedavg import FedAvgParams, FedAvgServer
from fedcmd_core.training import LossTerm

LINEAR = "feddyn::"  # prefix of the device's linear-term arrays in its state


class FedDynParams(FedAvgParams):
    alpha: float = Field(0.01, gt=0, description="weight of the dynamic regulariser")


class FedDynServer(FedAvgServer):
    state_fields = ("h",)

    def __init__(self, params: FedDynParams, ctx: ServerContext) -> None:
        super().__init__(params, ctx)
        self.params: FedDynParams = params
        self.trainable = ctx.spec.trainable_keys()
        self.h = np.zeros(flatten(self.global_arrays, self.trainable).size, dtype=np.float64)

    def aggregate(self, rnd: int, round_updates: Mapping[int, Update]) -> dict[str, Any]:
        updates = list(round_updates.values())
        if not updates:
            return {}
        alpha = self.params.alpha
        keys = list(updates[0].arrays)
        start = flatten(self.global_arrays, self.trainable).astype(np.float64)
        thetas = np.stack([flatten(u.arrays, self.trainable).astype(np.float64) for u in updates])
        self.h -= alpha / self.ctx.num_clients * (thetas - start).sum(axis=0)
        # Non-trainable shared entries (BN statistics) are a plain uniform mean.
        self.global_arrays.update(self.average([u.arrays for u in updates], [1.0] * len(updates), keys))
        new = thetas.mean(axis=0) - self.h / alpha
        self.global_arrays.update(unflatten(new.astype(np.float32), self.global_arrays, self.trainable))
        return {"h_norm": float(np.linalg.norm(self.h))}


class FedDynClient(ClientStrategy):
    def __init__(self, params: FedDynParams, ctx: ClientContext) -> None:
        super().__init__(params, ctx)
        self.params: FedDynParams = params

    def _named(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.ctx.model.named_parameters() if p.requires_grad]

    def loss_term(self, task: Task) -> LossTerm | None:
        if task.kind != "fit":
            return None  # evaluation fine-tuning is plain cross-entropy
        alpha = self.params.alpha
        named = self._named()
        if not named:
            return None
        params = [p for _, p in named]
        anchors = [p.detach().clone() for p in params]  # the received global model
        linear = [self._linear(n, p) for n, p in named]

        def dynamic(model: nn.Module) -> torch.Tensor:
            total = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
            for p, a, g in zip(params, anchors, linear):
                total = total - (g * p).sum() + 0.5 * alpha * ((p - a) ** 2).sum()
            return total

        return dynamic

    def _linear(self, name: str, p: nn.Parameter) -> torch.Tensor:
        g = self.state.get(LINEAR + name)
        if g is None:
            return torch.zeros_like(p).detach()
        return torch.from_numpy(g.copy()).to(p.device, p.dtype)

    def local_train(self, task: Task, generator: torch.Generator) -> None:
        names = [n for n, _ in self._named()]
        start = model_arrays(self.ctx.model, names)
        super().local_train(task, generator)
        end = model_arrays(self.ctx.model, names)
        alpha = self.params.alpha
        for n in names:
            g = self.state.get(LINEAR + n)
            g = np.zeros_like(start[n]) if g is None else g
            # first-order condition of the local problem: grad L_k(w_k) = g_k - alpha (w_k - w_global)
            self.state[LINEAR + n] = (g - alpha * (end[n] - start[n])).astype(start[n].dtype)


ALGORITHM = Algorithm("feddyn", FedDynParams, FedDynServer, FedDynClient)
