"""FedProx (Li et al., MLSys 2020, arXiv:1812.06127): FedAvg whose local loss adds the proximal term
mu/2 ||w - w_global||^2, which keeps each device near the model it received.

Follows the paper and FL-bench (the term's gradient mu (w - w_global) on every trained parameter, computed
against a detached copy of the received model). The paper's inexact-solver/straggler handling is the
coordinator's ``straggler_ratio``, not part of this file.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from fedcmd_core.strategies.base import Algorithm, ClientContext, ClientStrategy, Task
from fedcmd_core.strategies.fedavg import FedAvgParams, FedAvgServer
from fedcmd_core.training import LossTerm


class FedProxParams(FedAvgParams):
    mu: float = Field(1.0, ge=0, description="weight of the proximal term mu/2 ||w - w_global||^2")


class FedProxServer(FedAvgServer):
    """Cloud side: FedAvg's; the proximal term lives on the device."""


class FedProxClient(ClientStrategy):
    def __init__(self, params: FedProxParams, ctx: ClientContext) -> None:
        super().__init__(params, ctx)
        self.params: FedProxParams = params

    def loss_term(self, task: Task) -> LossTerm | None:
        mu = self.params.mu
        if task.kind != "fit" or mu == 0:
            return None  # evaluation fine-tuning is plain cross-entropy, as in FL-bench
        params = [p for p in self.ctx.model.parameters() if p.requires_grad]
        if not params:
            return None
        # Called right before training: the model holds what the cloud sent (plus local entries).
        anchors = [p.detach().clone() for p in params]

        def proximal(model: nn.Module) -> torch.Tensor:
            total = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
            for p, a in zip(params, anchors):
                total = total + ((p - a) ** 2).sum()
            return 0.5 * mu * total

        return proximal


ALGORITHM = Algorithm("fedprox", FedProxParams, FedProxServer, FedProxClient)
