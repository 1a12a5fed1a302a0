"""``fedcmd simulate``: the coordinator and every client's agent in one process, over the in-memory
transport (or, with ``transport = "mqtt"``, agents in worker processes over a real broker), through exactly
the interfaces a real fleet uses. The parts are in ``cloud/sim/setup.py``."""

from __future__ import annotations

import time
from collections.abc import Callable

from cloud.config import RunConfig
from cloud.monitor.events import EventBus
from cloud.service.coordinator import RoundRecord
from cloud.sim.pool import resolve_jobs
from cloud.sim.setup import (
    FLEET,
    Prepared,
    SimulationResult,
    check_paths,
    load_data,
    make_agent,
    prepare,
    run_coordinator,
)
from protocols.memory import MemoryTransport

__all__ = [
    "FLEET", "Prepared", "SimulationResult", "build_and_run", "check_paths", "load_data", "make_agent", "prepare",
    "run_coordinator",
]


def build_and_run(
    cfg: RunConfig,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    transport: MemoryTransport | None = None,
    events: EventBus | None = None,
) -> SimulationResult:
    """Run a whole simulation; raises ConfigError / DataError for user mistakes and DiskError for paths
    that cannot be written before any work, DiskError when a checkpoint write fails during the run.
    ``events``: the coordinator's event stream, for watchers (the dashboard, Prometheus, TensorBoard)."""
    started = time.perf_counter()
    check_paths(cfg)
    p = prepare(cfg)
    if cfg.transport == "mqtt":
        from cloud.sim.fleet import run_mqtt_simulation

        return run_mqtt_simulation(p, on_round=on_round, on_start=on_start, started=started, events=events)
    jobs = resolve_jobs(cfg.jobs, p.partition.num_clients) if transport is None else 1
    if jobs > 1 and p.device.type != "cpu":
        jobs = 1  # CUDA cannot be used after fork: several clients per GPU is the GPU engine's job
    if jobs > 1:
        from cloud.sim.pool import run_parallel

        return run_parallel(p, jobs, on_round, on_start, started, events=events)
    transport = transport or MemoryTransport()
    for cid in range(p.partition.num_clients):
        make_agent(p, transport, cid).announce()
    return run_coordinator(p, transport, on_round, on_start, started, events=events)
