"""``fedcmd cloud serve``: the coordinator as a long-running service on an MQTT broker.

It publishes the run description in its retained status (devices build their side from it), waits for
enough devices, runs the rounds with a deadline and a quorum, checkpoints after every round, resumes
from the checkpoint after a restart, and writes the run folder at the end.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, ValidationError, field_validator

from cloud import run_output
from cloud.config import ConfigError, Unavailable
from cloud.monitor.config import MonitorConfig
from cloud.monitor.events import EventBus
from cloud.provenance import provenance
from cloud.service.coordinator import Coordinator, RoundRecord, RoundSettings
from fedcmd_core.runspec import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    RunSpec,
    build_server,
    first_error,
)
from fedcmd_core.state_tree import DiskError, check_writable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger("fedcmd.cloud")


__all__ = ["ServeConfig", "Stopped", "Unavailable", "load_serve_config", "serve"]


class Stopped(Exception):
    """SIGTERM or SIGINT: the coordinator stopped; running it again resumes from its last checkpoint."""


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM / SIGINT into ``Stopped`` in the main thread, so the retained status can say so."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread (e.g. serve() run by a test thread)
        return

    def stop(signum: int, frame: object) -> None:
        raise Stopped(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fleet: str = "default"
    broker: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password_file: Path | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    checkpoint: Path = Path("cloud-state/checkpoint.safetensors")
    out: Path = Path("runs/cloud")
    join_ratio: Annotated[StrictFloat, Field(gt=0, le=1)] = 0.1
    min_clients: PositiveInt = Field(1, description="fewer answers than this and a round is not aggregated")
    round_deadline: PositiveFloat = Field(600.0, description="seconds a round (or relay step) waits for devices")
    wait_clients: PositiveInt = Field(1, description="start when this many devices are online")
    registration_timeout: PositiveFloat = 3600.0
    straggler_ratio: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.0
    straggler_min_local_epoch: NonNegativeInt = 1
    test_gap: NonNegativeInt = 0
    update_codec: Literal["none", "fp16", "int8"] = "none"
    # seconds the coordinator keeps waiting for a broker that went away (re-connecting with back-off);
    # None: forever. Past it, a publish fails and the service exits (3) to be restarted.
    max_outage: NonNegativeFloat | None = None
    # The broker enforces per-device ACLs (`fedcmd deploy acl`): nobody else can publish on a device's topic,
    # so a device whose answer is rejected is settled for the round instead of waited for until the deadline.
    device_acl: StrictBool = False
    run: RunSpec
    # the live dashboard and Prometheus /metrics (off unless [monitor] enabled = true)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, v: str) -> str:
        # a wrong scheme is a config mistake (exit 2); retrying it (exit 3) would never help
        if not v.startswith(("mqtt://", "mqtts://")):
            raise ValueError("must be mqtt://host:port (mqtts://host:port for TLS)")
        return v

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_file(cls, v: Path) -> Path:
        if v.is_dir():
            raise ValueError(f"{v} is a folder; give a file path such as {v / 'checkpoint.safetensors'}")
        return v

    @field_validator("out")
    @classmethod
    def _out_folder(cls, v: Path) -> Path:
        if v.exists() and not v.is_dir():
            raise ValueError(f"{v} is a file; give the folder metrics.csv and summary.json go to")
        return v


def load_serve_config(path: Path) -> ServeConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
        return ServeConfig(**data)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    except ValidationError as e:
        raise ConfigError(f"{path}: {first_error(e, model=ServeConfig)}") from None


def check_paths(cfg: ServeConfig) -> None:
    """Prove the checkpoint's folder and the run folder are writable before any device is asked to work."""
    check_writable(cfg.checkpoint.parent, "checkpoint")
    check_writable(cfg.out, "out")


def serve(cfg: ServeConfig, transport: Any = None, events: EventBus | None = None) -> list[RoundRecord]:
    """Run (or resume) the federated training described by ``cfg``; returns the round records. The run
    folder is written from the coordinator's event stream (``events``: add watchers there), the same one
    the ``[monitor]`` dashboard and Prometheus read."""
    from protocols.mqtt import CredentialsError, connect
    from protocols.transport import TransportError

    try:
        server = build_server(cfg.run)
    except ValueError as e:  # SpecError (input_shape vs model) included
        raise ConfigError(f"run: {e}") from None
    check_paths(cfg)
    events = events if events is not None else EventBus()
    recorder = events.subscribe(run_output.RunRecorder(), critical=True)
    monitor = None
    if cfg.monitor.enabled:
        from cloud.monitor.server import start_monitor

        monitor = start_monitor(cfg.monitor, events, title=f"fleet {cfg.fleet}: {cfg.run.algo}")
        log.info("monitor: %s", monitor.url)
    if transport is None:
        try:
            transport = connect(cfg.broker, f"{cfg.fleet}-coordinator", username=cfg.username,
                                password_file=cfg.password_file, ca=cfg.ca, cert=cfg.cert, key=cfg.key,
                                connect_timeout=30.0, max_outage=cfg.max_outage)
        except CredentialsError as e:
            raise ConfigError(str(e)) from None  # exit 2: fix the files, a restart will not help
        except TransportError as e:
            raise Unavailable(str(e)) from None
    settings = RoundSettings(
        num_clients=cfg.run.num_clients,
        global_epoch=cfg.run.global_epoch,
        join_ratio=cfg.join_ratio,
        seed=cfg.run.seed,
        local_epoch=cfg.run.local_epoch,
        straggler_ratio=cfg.straggler_ratio,
        straggler_min_local_epoch=cfg.straggler_min_local_epoch,
        deadline=cfg.round_deadline,
        min_clients=cfg.min_clients,
        test_gap=cfg.test_gap,
        track_presence=True,
        update_codec=cfg.update_codec,
        clip_factor=cfg.run.clip_factor,
        settle_on_bad_answer=cfg.device_acl,
    )
    try:
        coordinator = Coordinator(transport, server, cfg.fleet, settings, cfg.checkpoint,
                                  run_info=cfg.run.model_dump(mode="json"), events=events)
    except ValueError as e:
        if monitor is not None:
            monitor.stop()
        raise ConfigError(str(e)) from None
    try:
        return _serve(cfg, coordinator, transport, recorder)
    finally:
        if monitor is not None:
            monitor.stop()


def _serve(cfg: ServeConfig, coordinator: Coordinator, transport: Any, recorder: run_output.RunRecorder,
           ) -> list[RoundRecord]:
    from protocols.transport import TransportError

    with _stop_on_signals():
        try:
            coordinator.publish_status("waiting")
            log.info("waiting for %d devices in fleet %r", cfg.wait_clients, cfg.fleet)
            if not coordinator.wait_for_clients(cfg.wait_clients, cfg.registration_timeout):
                coordinator.publish_status("stopped")
                transport.close()
                raise Unavailable(
                    f"only {len(coordinator.online)} devices came online within {cfg.registration_timeout} s"
                )
            started = time.perf_counter()
            records = coordinator.run(lambda r: log.info("round %d done: %s", r.round + 1, r.metrics))
        except (Stopped, DiskError):
            # Stopped: rounds up to the last checkpoint are kept. DiskError: the checkpoint could not be
            # written; the previous one is intact, so a restart once the disk is fixed resumes from it.
            coordinator.publish_status("stopped")
            transport.close()
            raise
        except TransportError as e:  # the broker stayed away longer than max_outage: worth a restart (3)
            transport.close()
            raise Unavailable(str(e)) from None
    final = coordinator.evaluate_all(cfg.run.global_epoch - 1)
    coordinator.publish_status("finished")
    coordinator.finish(final, time.perf_counter() - started)
    spec = cfg.run
    info = run_output.RunInfo(
        spec.algo, "devices' own", spec.model, spec.seed, spec.num_clients, cfg.fleet,
        json.loads(cfg.model_dump_json()), provenance(), save_log=False,
    )
    try:
        cfg.out.mkdir(parents=True, exist_ok=True)
        run_output.write_run(recorder, cfg.out, "", info)
    except DiskError:
        raise
    except OSError as e:
        raise DiskError(f"out: could not write the results to {cfg.out}: {e.strerror or e}", e.errno) from e
    finally:
        transport.close()
    return records
