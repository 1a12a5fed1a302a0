"""SGD without torch.optim's start-up cost, bit for bit the same steps as ``torch.optim.SGD``.

``torch.optim.Optimizer.__init__`` and ``step`` import ``torch._dynamo`` on first use (their
``_disable_dynamo`` / ``_use_grad_for_differentiable`` wrappers): about 0.9 s of a quiet machine's
start-up, and several seconds on a busy one, for a compiler we never use. ``LeanSGD`` is a
``torch.optim.SGD`` (``isinstance`` holds, ``param_groups`` and ``state`` have torch's layout, so
``fedcmd_core/optim.py`` saves and loads its momentum buffers unchanged) whose constructor, ``step``
and ``zero_grad`` skip those wrappers and run the arithmetic of torch's single-tensor CPU path
(``torch/optim/sgd.py: _single_tensor_sgd``; torch picks it for CPU tensors). Anything beyond plain
dense SGD (nesterov, dampening, maximize, a tensor learning rate) is refused, never approximated.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


class LeanSGD(torch.optim.SGD):
    def __init__(self, params: Iterable[nn.Parameter], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        # Deliberately not super().__init__(): that is where torch._dynamo gets imported.
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"invalid SGD settings: lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        self.defaults = dict(lr=lr, momentum=momentum, dampening=0.0, weight_decay=weight_decay, nesterov=False,
                             maximize=False, foreach=None, differentiable=False, fused=None)
        self.state: defaultdict[torch.Tensor, Any] = defaultdict(dict)
        group = {"params": list(params), **self.defaults}
        for p in group["params"]:
            if not isinstance(p, torch.Tensor) or p.is_sparse:
                raise TypeError("LeanSGD optimizes dense tensors only")
        self.param_groups = [group]
        # The hook tables torch's own methods read, should anything call them.
        self._optimizer_step_pre_hooks: dict[int, Any] = {}
        self._optimizer_step_post_hooks: dict[int, Any] = {}
        self._optimizer_state_dict_pre_hooks: dict[int, Any] = {}
        self._optimizer_state_dict_post_hooks: dict[int, Any] = {}
        self._optimizer_load_state_dict_pre_hooks: dict[int, Any] = {}
        self._optimizer_load_state_dict_post_hooks: dict[int, Any] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_()
                    p.grad.requires_grad_(False)
                    p.grad.zero_()

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("LeanSGD takes no closure")
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            if group["nesterov"] or group["dampening"] or group["maximize"] or isinstance(lr, torch.Tensor):
                raise ValueError("LeanSGD runs plain SGD only (no nesterov, dampening, maximize or tensor lr)")
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if wd != 0:
                    grad = grad.add(p, alpha=wd)
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = grad.detach().clone()
                        state["momentum_buffer"] = buf
                    else:
                        buf.mul_(momentum).add_(grad, alpha=1.0)
                    grad = buf
                p.add_(grad, alpha=-lr)
