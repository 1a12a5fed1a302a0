"""``fedcmd simulate --transport mqtt``: a fleet of real MQTT agents on one machine.

The coordinator runs in this process; the agents are spread over worker processes, each agent a real
MQTT client with its own client id and its own network thread, answering tasks on its own thread.
With one torch thread per worker, two cores serve hundreds of agents (only a round's sampled agents
train; the rest wait on their sockets).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from cloud.config import RunConfig, Unavailable
from cloud.service.coordinator import RoundRecord
from cloud.sim.setup import FLEET, Prepared, SimulationResult, make_agent, prepare, run_coordinator
from protocols.topics import presence_topic

log = logging.getLogger("fedcmd.fleet")
WORKER_UNAVAILABLE = 3  # a worker's exit code when it cannot reach the broker


def _worker(cfg_json: str, url: str, cids: list[int], ready: Any, stop: Any) -> None:
    """A worker process: builds its agents, each with its own MQTT connection, and serves them."""
    import json

    import torch

    from protocols.mqtt import MqttTransport
    from protocols.transport import TransportError

    torch.set_num_threads(1)
    p = prepare(RunConfig(**json.loads(cfg_json)))
    threads = []
    transports = []
    for cid in cids:
        offline = json.dumps({"state": "offline", "client": cid}).encode()
        try:
            transport = MqttTransport(
                url, f"{FLEET}-agent-{cid}", will=(presence_topic(FLEET, cid), offline, True), connect_timeout=30.0
            )
        except TransportError as e:  # one line, not a worker traceback; the parent reports the exit code
            print(f"agent worker: {e}", file=sys.stderr)
            sys.exit(WORKER_UNAVAILABLE)
        # Each agent trains on its own thread, so it needs its own workspace model.
        agent = make_agent(p, transport, cid, model=p.spec.build_model())
        agent.announce()
        transports.append(transport)
        thread = threading.Thread(target=transport.run_until, args=(stop.is_set, None), daemon=True)
        thread.start()
        threads.append(thread)
    ready.release()
    stop.wait()
    for t in transports:
        t.close()


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """Peak resident set size of one live process so far (Linux ``VmHWM``), MB; None where /proc lacks it.

    Per process, unlike ``getrusage(RUSAGE_CHILDREN).ru_maxrss``, which is the largest of every child
    ever waited for: a second fleet's workers would report the first fleet's peak."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def run_mqtt_simulation(
    p: Prepared,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    started: float | None = None,
    stats_out: dict[str, Any] | None = None,
) -> SimulationResult:
    from protocols.mqtt import MqttTransport
    from protocols.transport import TransportError

    cfg = p.cfg
    broker = None
    url = cfg.broker  # 'auto' or an mqtt(s):// URL: RunConfig checked it
    if url == "auto":
        from protocols.broker import start_broker

        broker = start_broker("auto")
        url = broker.url
    # The coordinator connects first: an unreachable broker is one line (exit 3) before any worker starts.
    try:
        transport = MqttTransport(url, f"{FLEET}-coordinator", connect_timeout=10.0)
    except TransportError as e:
        if broker is not None:
            broker.stop()
        raise Unavailable(str(e)) from None
    n = p.partition.num_clients
    workers = cfg.workers or max(1, min(os.cpu_count() or 1, n))
    groups = [list(range(n))[w::workers] for w in range(workers)]
    ctx = mp.get_context("spawn")  # no fork after torch and paho threads exist
    stop = ctx.Event()
    ready = ctx.Semaphore(0)
    # one torch thread per worker: the agents of a worker already train in parallel threads
    worker_cfg = cfg.model_copy(update={"transport": "memory", "out": None, "threads": 1}).model_dump_json()
    procs = [ctx.Process(target=_worker, args=(worker_cfg, url, g, ready, stop), daemon=True) for g in groups if g]
    try:
        for proc in procs:
            proc.start()
        deadline_at = time.monotonic() + 300
        for _ in procs:
            if not ready.acquire(timeout=max(1.0, deadline_at - time.monotonic())):
                dead = [pr for pr in procs if not pr.is_alive()]
                if dead and all(pr.exitcode == WORKER_UNAVAILABLE for pr in dead):
                    raise Unavailable(f"agent workers could not reach the MQTT broker at {url}")
                raise RuntimeError(f"agent workers did not start (dead: {[pr.pid for pr in dead]})")
        result = run_coordinator(p, transport, on_round, on_start, started, registration_timeout=120)
        if stats_out is not None:
            rounds = max(1, len(result.records))
            peaks = [peak_rss_mb(proc.pid) for proc in procs if proc.pid is not None]  # alive: stop is not set
            stats_out.update(
                workers=len(procs),
                worker_peak_rss_mb=[x for x in peaks if x is not None],
                messages_per_round=(transport.stats["messages_out"] + transport.stats["messages_in"]) / rounds,
                chunks_per_round=(transport.stats["chunks_out"] + transport.stats["chunks_in"]) / rounds,
            )
        return result
    finally:
        stop.set()
        transport.close()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
        if broker is not None:
            broker.stop()
