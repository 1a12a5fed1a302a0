"""FedBABU (Oh et al., ICLR 2022, arXiv:2106.06042): the head (classifier) stays frozen at its random
initialisation while the body is trained and averaged; each device fine-tunes at evaluation time.

Follows the paper and FL-bench: the head is left out of the optimizer (so it never moves, not even by weight
decay) and never uploaded; the body is FedAvg. Evaluation tasks fine-tune a throwaway copy of the whole
model (FL-bench's default fine-tune; ``finetune="head"`` tunes the head only) for ``--finetune_epoch``
epochs, or ``finetune_epochs`` when that is 0.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field
from torch import nn

from fedcmd_core.models import layer_of
from fedcmd_core.strategies.base import Algorithm, ClientContext, ClientStrategy, ServerContext, Task
from fedcmd_core.strategies.fedavg import FedAvgParams, FedAvgServer


class FedBABUParams(FedAvgParams):
    head_layers: tuple[str, ...] = ("classifier",)
    finetune_epochs: int = Field(1, ge=0, description="fine-tuning epochs at evaluation when --finetune_epoch is 0")
    finetune: Literal["full", "head"] = "full"


class FedBABUServer(FedAvgServer):
    def __init__(self, params: FedBABUParams, ctx: ServerContext) -> None:
        super().__init__(params, ctx)
        self.params: FedBABUParams = params
        unknown = [h for h in params.head_layers if h not in ctx.spec.layer_names]
        if unknown:
            raise ValueError(f"fedbabu: head layers {unknown} are not layers of the model {ctx.spec.layer_names}")
        self.head = set(ctx.spec.keys_of(params.head_layers))

    def shared_keys(self, rnd: int) -> list[str]:
        # Never the head: the cloud's copy stays at the initial values a first-contact top-up sends.
        return [k for k in super().shared_keys(rnd) if k not in self.head]


class FedBABUClient(ClientStrategy):
    def __init__(self, params: FedBABUParams, ctx: ClientContext) -> None:
        if ctx.finetune_epoch == 0:
            ctx = replace(ctx, finetune_epoch=params.finetune_epochs)
        super().__init__(params, ctx)
        self.params: FedBABUParams = params

    def trainable(self, task: Task) -> list[nn.Parameter]:
        head = set(self.params.head_layers)
        named = [(n, p) for n, p in self.ctx.model.named_parameters() if p.requires_grad]
        if task.kind == "fit":
            return [p for n, p in named if layer_of(n) not in head]  # body only: the head stays at its init
        if self.params.finetune == "head":
            return [p for n, p in named if layer_of(n) in head]
        return [p for _, p in named]


ALGORITHM = Algorithm("fedbabu", FedBABUParams, FedBABUServer, FedBABUClient)
