"""Local training and evaluation on in-memory tensors.

No DataLoader: a client's data are a few tensors already on the device, and slicing them by a
permutation is several times faster than a DataLoader for the small batches federated clients use.
Unlike the released code we shuffle the training data every epoch (seeded, so runs repeat exactly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedcmd_core import optim
from fedcmd_core.optim import OptimSettings

# Called on the batches a strategy asked for, with the batch and every layer's output.
BatchHook = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor]], None]
# Extra loss terms (FedProx's proximal term, ...), added to the cross-entropy.
LossTerm = Callable[[nn.Module], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    local_epoch: int = 5
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    # fedcmd_core/optim.py: FL-bench's optimisers and learning-rate schedulers
    optimizer: str = "sgd"
    lr_scheduler: str = "none"
    lr_step_size: int = 10
    lr_gamma: float = 0.1
    lr_t_max: int = 10
    lr_eta_min: float = 0.0

    def optim(self) -> OptimSettings:
        return OptimSettings(self.optimizer, self.lr, self.momentum, self.weight_decay, self.lr_scheduler,
                             self.lr_step_size, self.lr_gamma, self.lr_t_max, self.lr_eta_min)


@dataclass
class EvalResult:
    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else 0.0


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    return optim.make_optimizer(params, cfg.optim())


def train_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    batch_hook: BatchHook | None = None,
    hook_every: int = 1,
    loss_term: LossTerm | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> int:
    """Train for ``epochs`` over (x, y) in shuffled batches; returns the number of optimizer steps."""
    model.train()
    n = x.shape[0]
    steps = 0
    criterion = nn.functional.cross_entropy
    for epoch in range(epochs):
        if on_epoch is not None:
            on_epoch(epoch)  # the learning-rate schedule
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if idx.numel() <= 1:
                continue  # BatchNorm cannot train on a batch of one (the reference skips it too)
            xb, yb = x[idx], y[idx]
            use_hook = batch_hook is not None and steps % hook_every == 0
            if use_hook:
                outputs = model(xb, return_all=True)
                logits = outputs[-1]
            else:
                logits = model(xb)
            loss = criterion(logits, yb)
            if loss_term is not None:
                loss = loss + loss_term(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if use_hook:
                with torch.no_grad():
                    batch_hook(xb, yb, [o.detach() for o in outputs])
            steps += 1
    return steps


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> EvalResult:
    """Summed cross-entropy, correct predictions and count, in eval mode."""
    if x.shape[0] == 0:
        return EvalResult()
    was_training = model.training
    model.eval()
    result = EvalResult()
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        logits = model(xb)
        result.loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        result.correct += int((logits.argmax(dim=1) == yb).sum())
        result.count += int(yb.numel())
    model.train(was_training)
    return result
