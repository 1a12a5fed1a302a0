"""What both sides of a run must agree on, and the one way to build each side from it.

The coordinator publishes a :class:`RunSpec` in its retained status; a device builds its model and
client strategy from it and its own data. The simulation builds both sides from the same spec, so a
simulated run and a deployed run execute the same code.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from fedcmd_core.models import build_model, model_name
from fedcmd_core.strategies import (
    ClientContext,
    ClientData,
    ClientStrategy,
    ModelSpec,
    ServerContext,
    ServerStrategy,
    algorithm,
    parse_params,
)
from fedcmd_core.training import TrainConfig


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    algo: str
    hp: dict[str, Any] = {}
    model: str = "lenet5"
    input_shape: tuple[int, ...]
    num_classes: int
    seed: int = 42
    num_clients: int
    global_epoch: int
    local_epoch: int = 5
    batch_size: int = 32
    local_lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    eval_train: bool = False
    eval_test: bool = True
    finetune_epoch: int = 0

    def train_config(self) -> TrainConfig:
        return TrainConfig(self.local_epoch, self.batch_size, self.local_lr, self.momentum, self.weight_decay)

    def build_model(self) -> torch.nn.Module:
        """The initial model: identical in every process (seeded)."""
        return build_model(model_name(self.model), self.input_shape, self.num_classes, seed=self.seed)


def build_server(spec: RunSpec, model: torch.nn.Module | None = None) -> ServerStrategy:
    server_cls, _ = algorithm(spec.algo)
    model = model if model is not None else spec.build_model()
    ctx = ServerContext(ModelSpec.from_model(model), spec.num_clients, spec.global_epoch, spec.seed)
    return server_cls(parse_params(spec.algo, spec.hp), ctx)


def build_client(
    spec: RunSpec,
    client_id: int,
    data: ClientData,
    model: torch.nn.Module | None = None,
    model_spec: ModelSpec | None = None,
    eval_data: ClientData | None = None,
) -> ClientStrategy:
    """A device's strategy. ``model`` is its workspace (shared between agents of one simulation process)."""
    _, client_cls = algorithm(spec.algo)
    model = model if model is not None else spec.build_model()
    ctx = ClientContext(
        model=model,
        spec=model_spec or ModelSpec.from_model(model),
        data=data,
        train=spec.train_config(),
        seed=spec.seed,
        client_id=client_id,
        eval_train=spec.eval_train,
        eval_test=spec.eval_test,
        finetune_epoch=spec.finetune_epoch,
        eval_data=eval_data,
    )
    return client_cls(parse_params(spec.algo, spec.hp), ctx)
