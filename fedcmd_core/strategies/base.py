"""The strategy interface: one class for the cloud side, one for the device side, per algorithm.

The coordinator owns the round loop and calls the server strategy; agents call the client strategy.
Everything that crosses between them is a :class:`Task` or an :class:`Update`: named arrays plus a
small JSON-able dict, so the same strategy runs over the in-memory transport and over MQTT.

Parameter flow rule: a task carries only the entries the cloud wants to overwrite. Every other entry
of the device's model is the device's own from its previous round (personal layers, BN statistics),
so "what stays local" is simply "what the cloud never sends".
"""

from __future__ import annotations

import time
from abc import ABC
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from fedcmd_core import optim, robust
from fedcmd_core.models import is_bn_statistic, layer_of
from fedcmd_core.params import Arrays, load_arrays, model_arrays
from fedcmd_core.training import EvalResult, TrainConfig, evaluate, make_optimizer, train_epochs


class StateVersionError(ValueError):
    """A checkpoint's strategy state was written by another state version (or names other fields)."""


class HyperParams(BaseModel):
    """Base for an algorithm's hyper-parameters: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoInfo(BaseModel):
    """The JSON extras a device may send with its update (validated by the coordinator before any strategy
    sees them). An algorithm whose devices report more declares its own model, every field bounded."""

    model_config = ConfigDict(extra="forbid", strict=True)


@dataclass
class Task:
    """Cloud -> device: train (``fit``) or only evaluate, starting from these arrays."""

    round: int
    kind: Literal["fit", "evaluate"]
    arrays: Arrays = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Update:
    """Device -> cloud: uploaded arrays, the sample count, evaluation counts and strategy extras."""

    round: int
    arrays: Arrays = field(default_factory=dict)
    num_samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelSpec:
    """What both sides know about the model: its initial state and layer structure."""

    initial: Arrays
    layer_names: list[str]

    @property
    def keys(self) -> list[str]:
        return list(self.initial)

    def keys_of(self, layers: Sequence[str]) -> list[str]:
        wanted = set(layers)
        return [k for k in self.initial if layer_of(k) in wanted]

    def trainable_keys(self) -> list[str]:
        return [k for k in self.initial if not is_bn_statistic(k)]

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelSpec:
        return cls(initial=model_arrays(model), layer_names=[n for n, _ in model.named_children()])


@dataclass
class ServerContext:
    spec: ModelSpec
    num_clients: int
    global_epoch: int
    seed: int
    # How "average" rounds combine updates: "mean" (data-size weighted), or the robust coordinate-wise
    # "trimmed_mean" (drops trim_ratio of the values at each end) and "median".
    aggregation: Literal["mean", "trimmed_mean", "median"] = "mean"
    trim_ratio: float = 0.1
    # Per-client bodies the cloud keeps (FedCMD): bytes in memory before the oldest go to memory-mapped
    # files under spill_dir (0: all in memory; spill_dir None: the system's temporary folder).
    body_budget_bytes: int = 0
    spill_dir: Path | None = None


# ----------------------------------------------------------------------------------------- cloud side
class ServerStrategy(ABC):
    """Cloud side. Default behaviour is FedAvg over all arrays; algorithms override what differs.

    The coordinator owns the round loop: ``begin_round`` with the sampled clients, ``task_for`` per client,
    ``on_update`` per accepted update (only the relay needs it), then ``aggregate`` with the round's
    accepted updates. A strategy keeps between rounds exactly the attributes its classes list in
    ``state_fields`` (collected over the class hierarchy); checkpoints carry those and ``state_version``."""

    name: ClassVar[str]
    Params: ClassVar[type[HyperParams]] = HyperParams
    Info: ClassVar[type[BaseModel]] = NoInfo  # the schema of Update.info from this algorithm's devices
    # Bump state_version when the meaning or layout of a checkpointed field changes: older checkpoints are
    # then refused instead of being loaded into the wrong shape.
    state_version: ClassVar[int] = 1
    state_fields: ClassVar[tuple[str, ...]] = ("global_arrays", "started")

    def __init__(self, params: HyperParams, ctx: ServerContext) -> None:
        self.params = params
        self.ctx = ctx
        self.global_arrays: Arrays = {k: v.copy() for k, v in ctx.spec.initial.items()}
        self.started: set[int] = set()

    # A device's first task carries every trainable entry, so that its personal layers start from the
    # cloud's current model (as FL-bench does), not from the random initialisation.
    send_full_first: ClassVar[bool] = True

    def task_for(self, rnd: int, cid: int, kind: Literal["fit", "evaluate"] = "fit") -> Task:
        """The task the coordinator sends: the strategy's own, topped up on a device's first contact."""
        task = self.configure_fit(rnd, cid) if kind == "fit" else self.configure_evaluate(rnd, cid)
        if self.send_full_first and cid not in self.started:
            arrays = dict(task.arrays)
            for k in self.ctx.spec.trainable_keys():
                arrays.setdefault(k, self.global_arrays[k])
            task.arrays = arrays
            if kind == "fit":
                self.started.add(cid)
        return task

    # --- round structure
    def sequential(self, rnd: int) -> bool:
        """True when this round's clients must train one after another (relay)."""
        return False

    def phase(self, rnd: int) -> str:
        return "train"

    def shared_keys(self, rnd: int) -> list[str]:
        """The entries sent to (and averaged from) devices in round ``rnd``."""
        return self.ctx.spec.keys

    # --- messages
    def begin_round(self, rnd: int, cids: Sequence[int]) -> None:
        """Called once with the round's sampled clients, before any task is configured."""

    def configure_fit(self, rnd: int, cid: int) -> Task:
        keys = self.shared_keys(rnd)
        return Task(rnd, "fit", {k: self.global_arrays[k] for k in keys}, {"upload": keys})

    def configure_evaluate(self, rnd: int, cid: int) -> Task:
        task = self.configure_fit(rnd, cid)
        return Task(rnd, "evaluate", task.arrays, task.config)

    def expected_upload(self, task: Task) -> list[str]:
        """The array names an answer to ``task`` must carry: exactly these, no more, no fewer."""
        if task.kind != "fit":
            return []
        return list(task.config.get("upload", list(task.arrays)))

    def average(
        self, states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], keys: Sequence[str]
    ) -> Arrays:
        """The mean every averaging algorithm uses: weighted, or trimmed / median (``ctx.aggregation``)."""
        return robust.aggregate(states, weights, keys, self.ctx.aggregation, self.ctx.trim_ratio)

    def on_update(self, rnd: int, cid: int, update: Update) -> None:
        """Each accepted update as it arrives, in sampling order (in relay rounds before the next device's
        task is made). Only algorithms that act on an update before the round ends (the relay) need it."""

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> dict[str, Any]:
        """The round's accepted updates (client -> update, in sampling order) into the strategy's state;
        returns JSON-able facts to log about the round. Default: the data-size weighted mean."""
        ups = list(updates.values())
        keys = list(ups[0].arrays) if ups else []
        if keys:
            self.global_arrays.update(self.average([u.arrays for u in ups], [max(u.num_samples, 1) for u in ups], keys))
        return {}

    def summary(self) -> dict[str, Any]:
        """Facts for summary.json (chosen layers, votes, ...)."""
        return {}

    # --- checkpoints: the declared fields only (params, context and what __init__ derives come from the config)
    @classmethod
    def checkpointed_fields(cls) -> list[str]:
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            for n in klass.__dict__.get("state_fields", ()):
                if n not in names:
                    names.append(n)
        return names

    def state_dict(self) -> dict[str, Any]:
        # a field that stores itself (a BodyStore) gives its plain state
        values = {n: getattr(self, n) for n in self.checkpointed_fields()}
        return {"version": self.state_version, "fields": {n: _plain(v) for n, v in values.items()}}

    def load_state_dict(self, state: Any) -> None:
        version = state.get("version") if isinstance(state, dict) else None
        fields = state.get("fields") if isinstance(state, dict) else None
        if version != self.state_version or not isinstance(fields, dict):
            raise StateVersionError(
                f"the checkpoint's {self.name} state is version {version}, this fedcmd reads version "
                f"{self.state_version}: resume it with the fedcmd that wrote it, or start a new run"
            )
        expected = self.checkpointed_fields()
        if set(fields) != set(expected):
            missing, extra = sorted(set(expected) - set(fields)), sorted(set(fields) - set(expected))
            raise StateVersionError(
                f"the checkpoint's {self.name} state (version {version}) has other fields than this fedcmd's "
                f"(missing {missing}, unexpected {extra}): it was written by another fedcmd; start a new run"
            )
        for n in expected:
            current = getattr(self, n, None)
            if hasattr(current, "load_state"):
                current.load_state(fields[n])
            else:
                setattr(self, n, fields[n])


def _plain(value: Any) -> Any:
    to_state = getattr(value, "to_state", None)
    return to_state() if callable(to_state) else value


# ---------------------------------------------------------------------------------------- device side
@dataclass
class ClientData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass
class ClientContext:
    """What a device-side strategy works with: a workspace model (shared, reloaded every task), its data,
    the training settings and a seed for this client."""

    model: nn.Module
    spec: ModelSpec
    data: ClientData
    train: TrainConfig
    seed: int
    client_id: int
    eval_train: bool = False
    eval_test: bool = True
    finetune_epoch: int = 0
    eval_data: ClientData | None = None  # global test set, when --global_testset


class ClientStrategy:
    """Device side. The default is plain local SGD: load, evaluate, train, evaluate, upload."""

    name: ClassVar[str]
    Params: ClassVar[type[HyperParams]] = HyperParams

    def __init__(self, params: HyperParams, ctx: ClientContext) -> None:
        self.params = params
        self.ctx = ctx
        # Everything this device keeps between rounds: its full last model and optimizer momentum.
        self.state: Arrays = {}

    # --- device state that survives restarts (the agent stores it in its state dir)
    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k not in ("params", "ctx")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)

    # --- hooks for algorithms
    def batch_hook(self, task: Task):  # -> BatchHook | None
        return None

    def loss_term(self, task: Task):  # -> LossTerm | None
        return None

    def trainable(self, task: Task) -> list[nn.Parameter]:
        return [p for p in self.ctx.model.parameters() if p.requires_grad]

    def local_train(self, task: Task, generator: torch.Generator) -> None:
        epochs = int(task.config.get("local_epoch", self.ctx.train.local_epoch))
        self._sgd(task, epochs, generator, self.trainable(task), self.batch_hook(task))

    def upload(self, task: Task, received: Arrays) -> tuple[Arrays, dict[str, Any]]:
        """Arrays (and JSON extras) to send back after training; default: the keys the cloud asked for."""
        keys = task.config.get("upload", list(task.arrays))
        return model_arrays(self.ctx.model, keys), {}

    # --- the fixed flow
    def fit(self, task: Task) -> Update:
        self._load(task)
        generator = self._generator(task)
        metrics = self._evaluate("before")
        started = time.perf_counter()
        self.local_train(task, generator)
        metrics["fit_seconds"] = time.perf_counter() - started
        metrics.update(self._evaluate("after"))
        arrays, info = self.upload(task, task.arrays)
        self.state.update(model_arrays(self.ctx.model))
        return Update(task.round, arrays, int(self.ctx.data.x_train.shape[0]), metrics, info)

    def evaluate(self, task: Task) -> Update:
        """Personalized evaluation; with finetune_epoch > 0 also after fine-tuning a throwaway copy."""
        self._load(task)
        metrics = self._evaluate("before")
        if self.ctx.finetune_epoch > 0:
            saved = model_arrays(self.ctx.model)
            self._sgd(task, self.ctx.finetune_epoch, self._generator(task), self.trainable(task), None)
            metrics.update(self._evaluate("after"))
            load_arrays(self.ctx.model, saved)
        return Update(task.round, {}, int(self.ctx.data.x_train.shape[0]), metrics, {})

    # --- helpers
    def _load(self, task: Task) -> None:
        base = self.state if self.state else self.ctx.spec.initial
        load_arrays(self.ctx.model, {k: v for k, v in base.items() if k in self.ctx.spec.initial})
        load_arrays(self.ctx.model, task.arrays)

    def _generator(self, task: Task) -> torch.Generator:
        # One stream per (run seed, round, client): identical wherever and in whatever order clients run.
        seed = (self.ctx.seed * 1_000_003 + task.round * 10_007 + self.ctx.client_id) % (2**63)
        torch.manual_seed(seed)  # dropout etc.
        return torch.Generator().manual_seed(seed)

    def _sgd(self, task: Task, epochs: int, generator: torch.Generator, params: list[nn.Parameter], hook) -> None:
        if epochs <= 0 or not params:
            return
        optimizer = make_optimizer(params, self.ctx.train)
        self._load_momentum(optimizer, params)
        settings = self.ctx.train.optim()
        first_epoch = optim.scheduler_epoch(self.state)

        def on_epoch(epoch: int) -> None:  # the schedule runs over the device's own local epochs
            optim.set_lr(optimizer, optim.scheduled_lr(settings, first_epoch + epoch))

        train_epochs(
            self.ctx.model,
            self.ctx.data.x_train,
            self.ctx.data.y_train,
            optimizer,
            epochs,
            self.ctx.train.batch_size,
            generator,
            batch_hook=hook,
            hook_every=int(task.config.get("hook_every", 1)),
            loss_term=self.loss_term(task),
            on_epoch=on_epoch if settings.lr_scheduler != "none" else None,
        )
        self._save_momentum(optimizer, params)
        if settings.lr_scheduler != "none":
            optim.set_scheduler_epoch(self.state, first_epoch + epochs)

    def _load_momentum(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        if not optim.keeps_state(self.ctx.train.optim()):
            return
        optim.load_state(optimizer, self._named(params), self.state)

    def _save_momentum(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        if not optim.keeps_state(self.ctx.train.optim()):
            return
        optim.save_state(optimizer, self._named(params), self.state)

    def _named(self, params: list[nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
        names = {id(p): n for n, p in self.ctx.model.named_parameters()}
        return [(names[id(p)], p) for p in params]

    def _evaluate(self, when: str) -> dict[str, float]:
        out: dict[str, float] = {}
        test = self.ctx.eval_data or self.ctx.data
        splits: list[tuple[str, EvalResult]] = []
        if self.ctx.eval_test:
            splits.append(("test", evaluate(self.ctx.model, test.x_test, test.y_test)))
        if self.ctx.eval_train:
            splits.append(("train", evaluate(self.ctx.model, self.ctx.data.x_train, self.ctx.data.y_train)))
        for split, res in splits:
            out[f"{split}_{when}_correct"] = float(res.correct)
            out[f"{split}_{when}_loss"] = res.loss_sum
            out[f"{split}_{when}_count"] = float(res.count)
        return out



# ------------------------------------------------------------------------------------------- the record
@dataclass(frozen=True)
class Algorithm:
    """One algorithm: its name, hyper-parameters and both sides. Each algorithm file ends with one (the
    registry collects them; a user's package adds its own through the ``fedcmd.algorithms`` entry points,
    docs/WRITING_A_STRATEGY.md). The record names both classes, so neither declares name or Params itself."""

    name: str
    params: type[HyperParams]
    server: type[ServerStrategy]
    client: type[ClientStrategy]

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum() or self.name != self.name.lower():
            raise ValueError(f"algorithm name {self.name!r}: lower-case letters, digits, '_' and '-' only")
        if not (issubclass(self.server, ServerStrategy) and issubclass(self.client, ClientStrategy)):
            raise TypeError(f"algorithm {self.name!r}: server must be a ServerStrategy, client a ClientStrategy")
        if not issubclass(self.params, HyperParams):
            raise TypeError(f"algorithm {self.name!r}: params must be a HyperParams model")
        for side in (self.server, self.client):
            # A class belongs to one record: a second record may not rename it or swap its Params.
            own_name, own_params = side.__dict__.get("name"), side.__dict__.get("Params")
            if (own_name is not None and own_name != self.name) or (own_params not in (None, self.params)):
                raise TypeError(f"algorithm {self.name!r}: {side.__name__} already belongs to algorithm {own_name!r}")
        for side in (self.server, self.client):
            side.name = self.name
            side.Params = self.params
