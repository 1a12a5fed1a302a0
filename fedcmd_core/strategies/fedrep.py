"""FedRep (Collins et al., ICML 2021, arXiv:2102.07078): the head is personal; each round a device first
trains its head with the body frozen, then the body with the head frozen, and only the body is averaged.

Epoch split: FL-bench's by default (of ``local_epoch`` epochs, the last ``train_body_epoch`` train the body,
the others the head); ``head_epochs`` set to a number gives the paper's form instead (that many head epochs,
then ``train_body_epoch`` body epochs). Evaluation fine-tuning trains the head only, as FL-bench.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from fedcmd_core.models import layer_of
from fedcmd_core.strategies.base import Algorithm, ClientContext, ClientStrategy, Task
from fedcmd_core.strategies.fedper import FedPerParams, FedPerServer


class FedRepParams(FedPerParams):
    train_body_epoch: int = Field(1, ge=0, description="epochs that train the body (head frozen)")
    head_epochs: int | None = Field(
        None, ge=0, description="None: local_epoch - train_body_epoch (FL-bench); a number: head epochs (paper)"
    )


class FedRepServer(FedPerServer):
    """Cloud side: FedPer's (the head stays local, the body is averaged); the schedule lives on the device."""


class FedRepClient(ClientStrategy):
    def __init__(self, params: FedRepParams, ctx: ClientContext) -> None:
        super().__init__(params, ctx)
        self.params: FedRepParams = params

    def _split(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        head = set(self.params.personal_layers)
        named = [(n, p) for n, p in self.ctx.model.named_parameters() if p.requires_grad]
        return [p for n, p in named if layer_of(n) in head], [p for n, p in named if layer_of(n) not in head]

    def epochs(self, task: Task) -> tuple[int, int]:
        """(head epochs, body epochs) of this fit task."""
        p = self.params
        local = int(task.config.get("local_epoch", self.ctx.train.local_epoch))
        if p.head_epochs is not None:
            return p.head_epochs, p.train_body_epoch
        body = min(p.train_body_epoch, local)
        return local - body, body

    def local_train(self, task: Task, generator: torch.Generator) -> None:
        head, body = self._split()
        head_epochs, body_epochs = self.epochs(task)
        # Head first (body frozen: not in the optimizer), then the body (head frozen).
        self._sgd(task, head_epochs, generator, head, None)
        self._sgd(task, body_epochs, generator, body, None)

    def trainable(self, task: Task) -> list[nn.Parameter]:
        return self._split()[0]  # evaluation fine-tuning: the head only


ALGORITHM = Algorithm("fedrep", FedRepParams, FedRepServer, FedRepClient)
