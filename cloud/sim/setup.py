"""The parts of a simulation (``fedcmd simulate``): data and strategies prepared once from a RunConfig, the
agents, and the coordinator over a given transport. ``cloud/sim/simulate.py`` runs them in memory;
``cloud/sim/fleet.py`` runs the agents in MQTT worker processes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from pydantic import ValidationError

from cloud import run_output
from cloud.config import ConfigError, RunConfig
from cloud.monitor.events import EventBus
from cloud.provenance import arrays_sha256, file_sha256, provenance
from cloud.service.coordinator import Coordinator, RoundRecord, RoundSettings
from cloud.sim.attacks import MaliciousClient, pick_attackers
from edge_agent.agent import Agent
from fedcmd_core.data import DataError, Dataset, Partition, PartitionArgs, load_dataset, make_partition
from fedcmd_core.models import build_model, model_name
from fedcmd_core.params import load_arrays
from fedcmd_core.runspec import RunSpec, TrainingSettings, build_client, build_server, first_error
from fedcmd_core.state_tree import check_writable
from fedcmd_core.strategies import ClientData, ClientStrategy, ModelSpec, ServerStrategy, parse_params
from protocols.transport import Transport

log = logging.getLogger("fedcmd.simulate")
FLEET = "sim"


@dataclass
class SimulationResult:
    config: RunConfig
    records: list[RoundRecord]
    final: dict[str, float]
    strategy_summary: dict[str, Any]
    partition: Partition
    seconds: float
    rejected: dict[str, int] = field(default_factory=dict)
    global_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    attackers: list[int] = field(default_factory=list)  # the malicious devices (--attackers)
    clipped: int = 0  # updates the coordinator scaled back to the clipping bound
    provenance: dict[str, Any] = field(default_factory=dict)  # version, commit, partition sha256, command line

    def paper_metric(self, last: int = 10) -> float:
        """Mean over the last ``last`` rounds of the pooled test accuracy before local training."""
        return run_output.paper_metric(self.records, last)


def load_data(cfg: RunConfig) -> tuple[Dataset, Partition]:
    options: dict[str, Any] = {}
    if cfg.dataset == "synthetic":
        options = {"client_num": cfg.client_num, "seed": cfg.seed}
    if cfg.partition is not None:
        if not cfg.partition.is_file():
            raise DataError(f"partition file {cfg.partition} does not exist; make one with `fedcmd data partition`")
        part = Partition.load(cfg.partition)
        dataset = load_dataset(cfg.dataset, root=cfg.root, download=cfg.download,
                               **(part.dataset_options(cfg.dataset) or options))
        part.check(dataset, source=str(cfg.partition))
        return dataset, part
    dataset = load_dataset(cfg.dataset, root=cfg.root, download=cfg.download, **options)
    args = PartitionArgs(
        client_num=cfg.client_num,
        iid=cfg.iid,
        alpha=cfg.alpha,
        classes=cfg.classes,
        shards=cfg.shards,
        least_samples=cfg.least_samples,
        split=cfg.split,
        fraction=cfg.fraction,
        seed=cfg.seed,
    )
    return dataset, make_partition(dataset, args)


def _device(cfg: RunConfig) -> torch.device:
    if not cfg.use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():  # asked for, not there: say so rather than quietly train on the CPU
        why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(f"--use_cuda 1: {why} (torch.cuda.is_available() is false); "
                          "drop --use_cuda to run on the CPU")
    return torch.device("cuda")


def _initial_model(cfg: RunConfig, dataset: Dataset) -> torch.nn.Module:
    try:
        name = model_name(cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if len(dataset.input_shape) == 1 and name not in ("2nn",):
        raise ConfigError(f"model {cfg.model!r} needs image inputs; dataset {cfg.dataset!r} has vectors: use -m 2nn")
    try:
        model = build_model(name, dataset.input_shape, dataset.num_classes, seed=cfg.seed)
    except RuntimeError as e:
        raise ConfigError(f"model {cfg.model!r} does not fit inputs {dataset.input_shape}: {e}") from None
    if cfg.external_model_params_file is not None:
        _load_external(model, cfg.external_model_params_file)
    return model


def _load_external(model: torch.nn.Module, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: only .safetensors parameter files are read (never pickled .pt files)")
    if not path.is_file():
        raise ConfigError(f"external model parameter file {path} does not exist")
    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path} is not a readable safetensors file: {e}") from None
    state = model.state_dict()
    bad = [k for k, v in arrays.items() if k not in state or tuple(state[k].shape) != v.shape]
    if bad:
        raise ConfigError(f"{path}: {len(bad)} entries do not match the model (first: {bad[0]!r})")
    load_arrays(model, arrays)


def _client_data(dataset: Dataset, partition: Partition, cid: int, device: torch.device) -> ClientData:
    tr = torch.from_numpy(partition.train[cid]).long()
    te = torch.from_numpy(partition.test[cid]).long()
    return ClientData(
        dataset.x[tr].to(device), dataset.y[tr].to(device), dataset.x[te].to(device), dataset.y[te].to(device)
    )


@dataclass
class Prepared:
    """Everything validated and built before any work: the run spec, data, initial model, server side."""

    cfg: RunConfig
    spec: RunSpec
    dataset: Dataset
    partition: Partition
    model: torch.nn.Module
    model_spec: ModelSpec
    device: torch.device
    server: ServerStrategy
    global_test: ClientData | None
    attackers: list[int] = field(default_factory=list)


def check_paths(cfg: RunConfig) -> None:
    """Prove --checkpoint's folder and --state-dir are writable before any data is loaded (DiskError)."""
    if cfg.checkpoint is not None:
        check_writable(cfg.checkpoint.parent, "--checkpoint")
    if cfg.state_dir is not None:
        check_writable(cfg.state_dir, "--state-dir")


def prepare(cfg: RunConfig) -> Prepared:
    """Validate the configuration and build the initial model and server strategy (ConfigError/DataError)."""
    torch.set_num_threads(cfg.threads)
    try:
        parse_params(cfg.algo, cfg.hp)
    except ValueError as e:  # pydantic ValidationError is a ValueError
        raise ConfigError(f"bad hyper-parameter for {cfg.algo}: {_first_error(e)}") from None
    dataset, partition = load_data(cfg)
    device = _device(cfg)
    model = _initial_model(cfg, dataset).to(device)
    try:  # the shared training settings, plus what the data decide
        spec = RunSpec(
            **cfg.model_dump(include=set(TrainingSettings.model_fields)),
            input_shape=tuple(int(d) for d in dataset.input_shape),
            num_classes=int(dataset.num_classes),
            num_clients=int(partition.num_clients),
        )
    except ValidationError as e:
        raise ConfigError(f"dataset {cfg.dataset!r}: {first_error(e)}") from None
    try:
        spill = cfg.state_dir / "cloud-bodies" if cfg.state_dir is not None else None
        server = build_server(spec, model, int(cfg.body_budget_mb * 2**20), spill)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.attackers > partition.num_clients:
        raise ConfigError(f"--attackers {cfg.attackers}: the partition has only {partition.num_clients} devices")
    attackers = pick_attackers(partition.num_clients, cfg.attackers, cfg.seed)
    global_test = None
    if cfg.global_testset:
        everyone = torch.from_numpy(np.concatenate(partition.test)).long()
        x, y = dataset.x[everyone].to(device), dataset.y[everyone].to(device)
        global_test = ClientData(x[:0], y[:0], x, y)
    return Prepared(cfg, spec, dataset, partition, model, ModelSpec.from_model(model), device, server, global_test,
                    attackers)


def make_agent(p: Prepared, transport: Transport, cid: int, model: torch.nn.Module | None = None) -> Agent:
    """One device: its data slice, its strategy, its agent. ``model`` is the workspace (default: shared)."""
    data = _client_data(p.dataset, p.partition, cid, p.device)
    if model is not None:
        load_arrays(model, p.model_spec.initial)
    client: ClientStrategy = build_client(p.spec, cid, data, model or p.model, p.model_spec, p.global_test)
    if cid in p.attackers:
        # duck-typed wrapper (cloud/sim/attacks.py): trains honestly, sends a poisoned update
        client = cast(ClientStrategy, MaliciousClient(client, p.cfg.attack, p.cfg.attack_scale, p.cfg.seed))
    if p.cfg.state_dir is not None:
        p.cfg.state_dir.mkdir(parents=True, exist_ok=True)
    return Agent(transport, FLEET, cid, client, state_dir=p.cfg.state_dir)


def run_coordinator(
    p: Prepared,
    transport: Transport,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    started: float | None = None,
    registration_timeout: float = 60.0,
    deadline: float | None = None,
    events: EventBus | None = None,
) -> SimulationResult:
    """Run the rounds; the result is what the coordinator's event stream (``events``, where the dashboard
    and other watchers subscribe) told the run-folder recorder."""
    cfg = p.cfg
    events = events if events is not None else EventBus()
    recorder = events.subscribe(run_output.RunRecorder(), critical=True)
    num_clients = p.partition.num_clients
    settings = RoundSettings(
        num_clients=num_clients,
        global_epoch=cfg.global_epoch,
        join_ratio=cfg.join_ratio,
        seed=cfg.seed,
        local_epoch=cfg.local_epoch,
        straggler_ratio=cfg.straggler_ratio,
        straggler_min_local_epoch=cfg.straggler_min_local_epoch,
        test_gap=cfg.test_gap,
        track_presence=True,
        deadline=deadline if deadline is not None else cfg.round_deadline,
        update_codec=cfg.update_codec,
        clip_factor=cfg.clip_factor,
        # the in-process transport and a private broker carry only our agents' messages
        settle_on_bad_answer=cfg.transport == "memory" or cfg.broker == "auto",
        # the coordinator rejects a num_samples above a device's known training-set size
        train_sizes={cid: len(train) for cid, train in enumerate(p.partition.train)},
    )
    try:
        coordinator = Coordinator(transport, p.server, FLEET, settings, checkpoint=cfg.checkpoint,
                                  events=events)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if p.attackers:
        log.warning("attackers (%s, scale %g): devices %s", cfg.attack, cfg.attack_scale, p.attackers)
    if not coordinator.wait_for_clients(num_clients, timeout=registration_timeout):
        raise RuntimeError(f"only {len(coordinator.online)} of {num_clients} agents came online")
    if on_start is not None:
        on_start(cfg.global_epoch)
    coordinator.run(on_round)
    final = coordinator.evaluate_all(cfg.global_epoch - 1)
    coordinator.publish_status("finished")
    coordinator.finish(final, time.perf_counter() - (started or time.perf_counter()))
    return SimulationResult(
        config=cfg,
        records=recorder.records,
        final=recorder.final,
        strategy_summary=recorder.strategy_summary,
        partition=p.partition,
        seconds=recorder.seconds,
        rejected=recorder.rejected,
        global_arrays=p.server.global_arrays if cfg.save_model else {},
        attackers=list(p.attackers),
        clipped=recorder.clipped,
        provenance=_provenance(cfg, p.partition),
    )


def _provenance(cfg: RunConfig, partition: Partition) -> dict[str, Any]:
    if cfg.partition is not None and cfg.partition.is_file():
        return provenance(file_sha256(cfg.partition), str(cfg.partition))
    return provenance(arrays_sha256(partition.train, partition.test), "generated (sha256 of the index arrays)")


def _first_error(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        err = errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"{where}: {err['msg']}"
    return str(e)
