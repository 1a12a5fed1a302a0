"""The resolved configuration of a run: TOML file, then command-line overrides, validated by pydantic."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictFloat, ValidationError, field_validator, model_validator

from fedcmd_core.atomic import DiskError, check_writable  # not state_tree: that one costs numpy at import
from fedcmd_core.runspec import (
    NonNegativeFloat,
    NonNegativeInt,
    NumClients,
    PositiveFloat,
    PositiveInt,
    TrainingSettings,
    first_error,
)
from fedcmd_core.suggest import unknown_key

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A user mistake in a config file or option; the text names the problem and the fix (exit 2)."""


class Unavailable(Exception):
    """The broker or the fleet is not there (yet): worth retrying later (exit 3), unlike a ConfigError."""


__all__ = [
    "ConfigError", "DiskError", "RunConfig", "Unavailable", "check_writable", "load_config_file", "recorded_config",
    "resolve",
]

AttackName = Literal["scale", "signflip", "noise", "nan"]


class RunConfig(TrainingSettings):
    """Every setting of ``fedcmd simulate``. Field names follow the seed's generic arguments; the training
    settings shared with cloud.toml's ``[run]`` (and their bounds) come from :class:`TrainingSettings`."""

    dataset: str = "mnist5k"
    # partition: either an existing file, or these generate_data.py settings
    partition: Path | None = None
    client_num: NumClients = 20
    alpha: NonNegativeFloat = 0.1
    iid: StrictBool = False
    classes: NonNegativeInt = 0
    shards: NonNegativeInt = 0
    least_samples: NonNegativeInt = 20
    split: Literal["sample", "user"] = "sample"
    fraction: Annotated[StrictFloat, Field(gt=0, lt=1)] = 0.5
    root: Path | None = None
    download: StrictBool = False
    # the seed's generic arguments (REFERENCE.md §4) not in TrainingSettings
    join_ratio: Annotated[StrictFloat, Field(gt=0, le=1)] = 0.1
    test_gap: NonNegativeInt = 100
    verbose_gap: PositiveInt = 10
    use_cuda: StrictBool = False
    global_testset: StrictBool = False
    straggler_ratio: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.0
    straggler_min_local_epoch: NonNegativeInt = 1
    external_model_params_file: Path | None = None
    save_log: StrictBool = True
    save_model: StrictBool = False
    save_fig: StrictBool = True
    save_metrics: StrictBool = True
    # runtime
    transport: Literal["memory", "mqtt"] = "memory"
    broker: str = Field("auto", description="'auto' (private mosquitto, else embedded amqtt) or mqtt://host:port")
    update_codec: Literal["none", "fp16", "int8"] = Field("none", description="quantisation of device updates")
    workers: NonNegativeInt = Field(0, description="agent worker processes for --transport mqtt (0: one per core)")
    # client-parallel training for the in-memory simulation (cloud/sim/pool.py); results equal one job's
    jobs: NonNegativeInt = Field(0, description="client worker processes (0: the free cores; 1: this process)")
    # seconds a round waits for its devices over MQTT (None: until every one answered); an attacker whose
    # update is rejected never answers, so attacked MQTT runs need one
    round_deadline: PositiveFloat | None = None
    checkpoint: Path | None = Field(None, description="coordinator checkpoint; an existing one is resumed")
    state_dir: Path | None = Field(None, description="where agents keep their state between rounds/restarts")
    # FedCMD's per-client bodies the cloud keeps: MB in memory, the rest in memory-mapped files under
    # state_dir (or the temporary folder); 0: all in memory
    body_budget_mb: NonNegativeFloat = 0.0
    # One thread: LeNet-sized batches gain little from two, and lose 5x when another process holds a core.
    threads: PositiveInt = Field(1, description="torch intra-op threads")
    out: Path | None = None
    # attack simulation (cloud/sim/attacks.py): this many of the simulated devices are malicious
    attackers: NonNegativeInt = 0
    attack: AttackName = "scale"
    attack_scale: PositiveFloat = 1e6
    # watching the run (cloud/monitor): the seed's --visible; 1 = the live web dashboard (+ Prometheus /metrics),
    # tensorboard = per-round scalars for TensorBoard; a non-loopback host needs FEDCMD_MONITOR_TOKEN
    visible: Literal["0", "1", "tensorboard"] = "0"
    visible_host: str = "127.0.0.1"
    visible_port: Annotated[int, Field(ge=0, le=65535)] = 8097
    visible_keep: NonNegativeFloat = 0.0  # seconds the dashboard stays up after the run (0: it closes)
    tensorboard: Path | None = None  # TensorBoard folder (default with --visible tensorboard: runs/tensorboard/...)

    @model_validator(mode="after")
    def _one_scheme(self) -> RunConfig:
        """One partition scheme: alpha is the default scheme, replaced by --iid, -c or -s when one of those is
        given; alpha given beside another is a conflict, not a silent choice (the seed took --iid first)."""
        if self.partition is not None:
            return self
        given = self.model_fields_set
        others = [flag for flag, on in (("--iid", self.iid), ("-c/--classes", self.classes > 0 and
                  self.dataset != "synthetic"), ("-s/--shards", self.shards > 0)) if on]
        if "alpha" in given and self.alpha > 0 and others:
            raise ValueError(f"alpha: -a/--alpha {self.alpha:g} (Dirichlet) and {others[0]} are two partition "
                             "schemes; give one")
        if len(others) > 1:
            raise ValueError(f"{others[0]} and {others[1]} are two partition schemes; give one")
        if others and "alpha" not in given:
            self.__dict__["alpha"] = 0.0  # the other scheme replaces the default Dirichlet split
        return self

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, v: str) -> str:
        if v != "auto" and not v.startswith(("mqtt://", "mqtts://")):
            raise ValueError("must be 'auto' or mqtt://host:port (mqtts:// for TLS)")
        return v

    @field_validator("visible", mode="before")
    @classmethod
    def _visible_word(cls, v: Any) -> Any:
        # the seed passes --visible 1 / 0 as numbers; TOML may hold a bool or an int
        return str(int(v)) if isinstance(v, (bool, int)) else v

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_file(cls, v: Path | None) -> Path | None:
        if v is not None and v.is_dir():
            raise ValueError(f"{v} is a folder; give a file path such as {v / 'checkpoint.safetensors'}")
        return v

    @field_validator("state_dir")
    @classmethod
    def _state_folder(cls, v: Path | None) -> Path | None:
        if v is not None and v.exists() and not v.is_dir():
            raise ValueError(f"{v} is a file, not a folder")
        return v


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML run config. ``[hp]`` holds hyper-parameters of the chosen algorithm and ``[hp.<algo>]``
    (or ``[<algo>]``) those of one algorithm, so one file serves several."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {' '.join(str(e).split())}") from None
    return data


def _algo_tables(merged: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Split a config's hyper-parameters into the flat ``[hp]`` keys and the per-algorithm tables."""
    hp = merged.pop("hp", None) or {}
    if not isinstance(hp, dict):
        raise ConfigError("hp: must be a table of KEY = VALUE (or [hp.<algo>] tables)")
    flat = {k: v for k, v in hp.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in hp.items() if isinstance(v, dict)}
    for key in [k for k, v in merged.items() if isinstance(v, dict) and k not in RunConfig.model_fields]:
        tables.setdefault(key, {}).update(merged.pop(key))  # the [<algo>] spelling
    return flat, tables


def _chosen_table(algo: str, tables: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The table of ``algo``, after checking every table: a known algorithm and valid keys and values (a
    typo in [hp.pfedsim] is found while running fedcmd, not when pfedsim's turn comes)."""
    from fedcmd_core.strategies import canonical_name, describe_hp_error, parse_params

    try:
        chosen = canonical_name(algo)
    except ValueError:
        chosen = None  # RunConfig names the unknown algorithm
    out: dict[str, Any] = {}
    for name, table in tables.items():
        try:
            canonical = canonical_name(name)
        except ValueError as e:
            raise ConfigError(f"[hp.{name}]: {e}") from None
        try:
            parse_params(canonical, table)
        except ValidationError as e:
            raise ConfigError(f"[hp.{name}]: {describe_hp_error(canonical, e)}") from None
        if canonical == chosen:
            out.update(table)
    return out


def resolve(file_values: dict[str, Any], cli_values: dict[str, Any]) -> RunConfig:
    """File first, then every option given on the command line (None = not given). Neither dict is changed."""
    cli_values = dict(cli_values)
    merged = dict(file_values)
    flat, tables = _algo_tables(merged)
    for key in merged:
        if key not in RunConfig.model_fields:
            raise ConfigError(unknown_key(key, RunConfig.model_fields, "setting"))
    algo = cli_values.get("algo") or merged.get("algo", RunConfig.model_fields["algo"].default)
    hp = {**flat, **_chosen_table(str(algo), tables), **(cli_values.pop("hp", None) or {})}
    merged.update({k: v for k, v in cli_values.items() if v is not None})
    merged["hp"] = hp
    try:
        cfg = RunConfig(**merged)
    except ValidationError as e:
        raise ConfigError(first_error(e, model=RunConfig)) from None
    return cfg


# The settings that make a partition here; with --partition they come from the file instead.
PARTITION_FIELDS = ("client_num", "alpha", "iid", "classes", "shards", "least_samples", "split", "fraction")


def recorded_config(cfg: RunConfig, num_clients: int, partition_meta: dict[str, Any]) -> dict[str, Any]:
    """config.json: the configuration the run used. With an imported partition the split settings are the
    file's own (those it records; null where it records none), not this command's unused defaults."""
    out = json.loads(cfg.model_dump_json())
    if cfg.partition is not None:
        args = partition_meta.get("args") if isinstance(partition_meta.get("args"), dict) else {}
        for key in PARTITION_FIELDS:
            out[key] = args.get(key)
        out["client_num"] = num_clients
        out["partition_scheme"] = partition_meta.get("scheme")
    return out
