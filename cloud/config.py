"""The resolved configuration of a run: TOML file, then command-line overrides, validated by pydantic."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A user mistake in a config file or option; the text names the problem and the fix."""


class RunConfig(BaseModel):
    """Every setting of ``fedcmd simulate``. Field names follow the seed's generic arguments."""

    model_config = ConfigDict(extra="forbid")

    algo: str = "fedcmd"
    dataset: str = "mnist5k"
    model: str = "lenet5"
    seed: int = 42
    # partition: either an existing file, or these generate_data.py settings
    partition: Path | None = None
    client_num: int = Field(20, ge=1)
    alpha: float = Field(0.1, ge=0)
    iid: bool = False
    classes: int = Field(0, ge=0)
    shards: int = Field(0, ge=0)
    least_samples: int = Field(20, ge=0)
    split: Literal["sample", "user"] = "sample"
    fraction: float = Field(0.5, gt=0, lt=1)
    root: Path | None = None
    download: bool = False
    # the seed's generic arguments (REFERENCE.md §4)
    join_ratio: float = Field(0.1, gt=0, le=1)
    global_epoch: int = Field(100, ge=1)
    local_epoch: int = Field(5, ge=0)
    finetune_epoch: int = Field(0, ge=0)
    test_gap: int = Field(100, ge=0)
    eval_test: bool = True
    eval_train: bool = False
    local_lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    verbose_gap: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    use_cuda: bool = False
    global_testset: bool = False
    straggler_ratio: float = Field(0.0, ge=0, le=1)
    straggler_min_local_epoch: int = Field(1, ge=0)
    external_model_params_file: Path | None = None
    save_log: bool = True
    save_model: bool = False
    save_fig: bool = True
    save_metrics: bool = True
    # runtime
    transport: Literal["memory", "mqtt"] = "memory"
    broker: str = Field("auto", description="'auto' (private mosquitto, else embedded amqtt) or mqtt://host:port")
    update_codec: Literal["none", "fp16", "int8"] = Field("none", description="quantisation of device updates")
    workers: int = Field(0, ge=0, description="agent worker processes for --transport mqtt (0: one per core)")
    checkpoint: Path | None = Field(None, description="coordinator checkpoint; an existing one is resumed")
    state_dir: Path | None = Field(None, description="where agents keep their state between rounds/restarts")
    # One thread: LeNet-sized batches gain little from two, and lose 5x when another process holds a core.
    threads: int = Field(1, ge=1, description="torch intra-op threads")
    out: Path | None = None
    # hyper-parameters of the chosen algorithm, validated by its own Params model
    hp: dict[str, Any] = Field(default_factory=dict)

    @field_validator("algo")
    @classmethod
    def _known_algo(cls, v: str) -> str:
        from fedcmd_core.strategies import canonical_name

        return canonical_name(v)


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML run config. An ``[<algo>]`` or ``[hp]`` table holds the algorithm's hyper-parameters."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    return data


def resolve(file_values: dict[str, Any], cli_values: dict[str, Any]) -> RunConfig:
    """File first, then every option given on the command line (None = not given)."""
    merged = dict(file_values)
    hp = dict(merged.pop("hp", {}) or {})
    algo = cli_values.get("algo") or merged.get("algo", "fedcmd")
    for key in list(merged):
        if isinstance(merged[key], dict) and key not in RunConfig.model_fields:
            if key.lower() != str(algo).lower():
                raise ConfigError(f"config table [{key}] does not match the algorithm {algo!r}; rename it [{algo}]")
            hp.update(merged.pop(key))
    hp.update(cli_values.pop("hp", None) or {})
    merged.update({k: v for k, v in cli_values.items() if v is not None})
    merged["hp"] = hp
    try:
        cfg = RunConfig(**merged)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{where}: {msg} (got {err.get('input')!r})") from None
    return cfg
