"""What both sides of a run must agree on, and the one way to build each side from it.

The coordinator publishes a :class:`RunSpec` in its retained status; a device builds its model and
client strategy from it and its own data. The simulation builds both sides from the same spec, so a
simulated run and a deployed run execute the same code.

:class:`TrainingSettings` is the one validated model of the training settings shared by ``[run]`` in
cloud.toml (:class:`RunSpec`) and ``fedcmd simulate`` (``cloud.config.RunConfig``). Types are strict
per field: a string is not an integer and a bool is neither (an int is a fine float). Strictness is
per field, not model-wide, because a RunSpec also arrives as JSON (lists for tuples) and RunConfig gets
paths as TOML strings.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    import torch

    from fedcmd_core.strategies import ClientData, ClientStrategy, ModelSpec, ServerStrategy
    from fedcmd_core.training import TrainConfig

# torch and the strategies are imported where used: `fedcmd data` and `fedcmd cloud status` read
# settings without paying for torch.

# Bounds that keep a bad number from allocating the machine away (issue 10: num_classes = 1e9 asked
# for 336 GB). 2**20 input values cover a 3 x 512 x 512 image.
MAX_NUM_CLASSES = 100_000
MAX_INPUT_VALUES = 2**20
MAX_CLIENTS = 1_000_000
MAX_EPOCHS = 1_000_000

# Reusable strict field types: the same bounds wherever a setting appears.
PositiveInt = Annotated[StrictInt, Field(ge=1)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]
Rounds = Annotated[StrictInt, Field(ge=1, le=MAX_EPOCHS)]
Epochs = Annotated[StrictInt, Field(ge=0, le=MAX_EPOCHS)]
NumClients = Annotated[StrictInt, Field(ge=1, le=MAX_CLIENTS)]
NumClasses = Annotated[StrictInt, Field(ge=2, le=MAX_NUM_CLASSES)]
PositiveFloat = Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)]
Aggregation = Literal["mean", "trimmed_mean", "median"]


class SpecError(ValueError):
    """A run description that cannot be built (e.g. an input shape the model does not accept)."""


class TrainingSettings(BaseModel):
    """The training settings a cloud.toml ``[run]`` table and ``fedcmd simulate`` share, validated once."""

    model_config = ConfigDict(extra="forbid")

    algo: str = "fedcmd"
    hp: dict[str, Any] = Field(default_factory=dict)
    model: str = "lenet5"
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] = 42
    global_epoch: Rounds = 100
    local_epoch: Epochs = 5
    batch_size: PositiveInt = 32
    local_lr: PositiveFloat = 0.01
    momentum: NonNegativeFloat = 0.0
    weight_decay: NonNegativeFloat = 0.0
    eval_train: StrictBool = False
    eval_test: StrictBool = True
    finetune_epoch: Epochs = 0
    # The device's optimiser and learning-rate schedule (fedcmd_core/optim.py, FL-bench's choices); the
    # schedule counts the device's own local epochs, its state stays on the device with the optimiser's.
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr_scheduler: Literal["none", "step", "cosine"] = "none"
    lr_step_size: Annotated[StrictInt, Field(ge=1, le=MAX_EPOCHS)] = 10
    lr_gamma: PositiveFloat = 0.1
    lr_t_max: Annotated[StrictInt, Field(ge=1, le=MAX_EPOCHS)] = 10
    lr_eta_min: NonNegativeFloat = 0.0
    # Robust aggregation (DESIGN.md §3 "Trust boundary"): how averaging rounds combine updates, and the
    # update-norm clip against the round's median norm (0 = off).
    aggregation: Aggregation = "mean"
    trim_ratio: Annotated[StrictFloat, Field(ge=0, lt=0.5, allow_inf_nan=False)] = 0.1
    clip_factor: NonNegativeFloat = 3.0

    @field_validator("algo")
    @classmethod
    def _known_algo(cls, v: str) -> str:
        from fedcmd_core.strategies import canonical_name

        return canonical_name(v)

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from fedcmd_core.models import model_name

        model_name(v)  # ValueError naming the known models
        return v

    @model_validator(mode="after")
    def _momentum_is_sgds(self) -> TrainingSettings:
        if self.optimizer != "sgd" and self.momentum != 0:
            raise ValueError(f"momentum: {self.optimizer} has no momentum setting (its moments are built in); "
                             "drop --momentum or use --optimizer sgd")
        return self

    @model_validator(mode="after")
    def _valid_hp(self) -> TrainingSettings:
        from fedcmd_core.strategies import parse_params

        try:
            parse_params(self.algo, self.hp)
        except ValidationError as e:
            from fedcmd_core.strategies import describe_hp_error

            raise ValueError(describe_hp_error(self.algo, e)) from None
        return self

    def train_config(self) -> TrainConfig:
        from fedcmd_core.training import TrainConfig

        return TrainConfig(self.local_epoch, self.batch_size, self.local_lr, self.momentum, self.weight_decay,
                           optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, lr_step_size=self.lr_step_size,
                           lr_gamma=self.lr_gamma, lr_t_max=self.lr_t_max, lr_eta_min=self.lr_eta_min)


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str] | None:
    """The field names of the (nested) model at ``loc``, or None when ``loc`` leaves the models."""
    for part in loc:
        field = model.model_fields.get(part)
        inner = field.annotation if field is not None else None
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return None
        model = inner
    return list(model.model_fields)


def first_error(e: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """One line naming the field, what is wrong and the value given, for any settings ValidationError."""
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]]
    parts = [prefix, *loc] if prefix else loc
    where = ".".join(parts) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    if msg.startswith("bad hyper-parameter"):  # raised by the model validator: it names its own field
        return f"{'.'.join(parts)}: {msg}" if parts else msg
    text = f"{where}: {msg}" if parts or err["type"] != "value_error" else msg  # a model check names its fields
    shown = "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict)
    if shown and not (isinstance(err["input"], str) and repr(err["input"]) in msg):  # quoted already: once
        text += f" (got {err['input']!r})"
    if err["type"] in ("int_type", "float_type", "bool_type") and isinstance(err.get("input"), str):
        text += "; write the value without quotes"
    elif err["type"] == "int_type" and isinstance(err.get("input"), float):
        text += "; write a whole number"
    elif err["type"] == "extra_forbidden":
        text = f"{where}: unknown setting; remove it or check its spelling"
        known = _fields_at(model, loc[:-1]) if model is not None else None
        if known is not None:
            from fedcmd_core.suggest import did_you_mean

            text = f"{where}: unknown setting{did_you_mean(loc[-1], known)} (valid: {', '.join(sorted(known))})"
    return text


class RunSpec(TrainingSettings):
    """The run description the coordinator publishes; a device builds its side from it."""

    algo: str
    global_epoch: Rounds
    input_shape: tuple[Annotated[StrictInt, Field(ge=1)], ...] = Field(min_length=1, max_length=4)
    num_classes: NumClasses
    num_clients: NumClients

    @field_validator("input_shape")
    @classmethod
    def _bounded_input(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if math.prod(v) > MAX_INPUT_VALUES:
            raise ValueError(f"{math.prod(v)} input values per sample, more than the {MAX_INPUT_VALUES} allowed")
        return v

    def build_model(self) -> torch.nn.Module:
        """The initial model: identical in every process (seeded). SpecError when the shape does not fit."""
        from fedcmd_core.models import build_model, model_name

        try:
            return build_model(model_name(self.model), self.input_shape, self.num_classes, seed=self.seed)
        except RuntimeError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SpecError(
                f"input_shape {list(self.input_shape)} does not fit model {self.model!r} ({first[:160]}); "
                "image models take [channels, height, width], 2nn any shape"
            ) from None


def build_server(
    spec: RunSpec, model: torch.nn.Module | None = None, body_budget_bytes: int = 0, spill_dir: Path | None = None
) -> ServerStrategy:
    from fedcmd_core.strategies import ModelSpec, ServerContext, algorithm, parse_params

    server_cls, _ = algorithm(spec.algo)
    model = model if model is not None else spec.build_model()
    ctx = ServerContext(ModelSpec.from_model(model), spec.num_clients, spec.global_epoch, spec.seed,
                        aggregation=spec.aggregation, trim_ratio=spec.trim_ratio,
                        body_budget_bytes=body_budget_bytes, spill_dir=spill_dir)
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
    from fedcmd_core.strategies import ClientContext, ModelSpec, algorithm, parse_params

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
