"""``fedcmd simulate --transport mqtt``: a fleet of real MQTT agents on this machine.

The coordinator runs in this process and publishes the run description (RunSpec) in its retained status
before any agent starts. The agents are spread over worker processes; a worker serves all of its agents
from one event loop (``protocols/mqtt_mux.py``: every agent its own MQTT client id, connection, last will
and presence, all multiplexed on one thread) and trains the sampled ones one at a time on its torch
thread, all of them sharing one workspace model. Each agent starts up as a device does
(``edge_agent/startup.py``): it reads the RunSpec from the retained status on its own connection, checks
it, builds its client strategy from its own slice of the one dataset its worker loaded, and announces
itself online. Only then it drops the status subscription (a simulation's own choice: 10,000 agents
would otherwise each receive every round's status).

Fail fast: workers report progress and errors through a pipe, and every wait of the coordinator also
watches them, so a worker that dies (SIGKILL included) or cannot connect its agents stops the run within
a fraction of a second with one line naming the cause (:class:`FleetFailed`, exit 3), never a hang.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cloud.config import Unavailable
from cloud.service.coordinator import RoundRecord
from cloud.sim.setup import FLEET, Prepared, SimulationResult, run_coordinator
from protocols.transport import Handler, Transport

log = logging.getLogger("fedcmd.fleet")
WORKER_UNAVAILABLE = 3  # a worker's exit code when it cannot reach the broker or start its agents
PROGRESS_EVERY_S = 0.5
WATCH_EVERY_S = 0.1  # how often the coordinator's waits look at the workers


class FleetFailed(Unavailable):
    """A fleet-simulation worker died or could not start its agents; the text names the worker and why."""


@dataclass
class WorkerJob:
    """What a worker needs, as a device has it: the broker, its clients' ids, and where their data are."""

    url: str
    protocol: str
    fleet: str
    cids: list[int]
    dataset: str
    partition: str
    root: str | None = None
    state_dir: str | None = None
    connect_rate: float = 500.0
    connect_timeout: float = 30.0
    global_testset: bool = False
    attackers: list[int] = field(default_factory=list)
    attack: str = "scale"
    attack_scale: float = 10.0
    seed: int = 0


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """Peak resident set size of one live process so far (Linux ``VmHWM``), MB; None where /proc lacks it.

    Per process, unlike ``getrusage(RUSAGE_CHILDREN).ru_maxrss``, which is the largest of every child
    ever waited for: a second fleet's workers would report the first fleet's peak."""
    return _status_mb(pid, "VmHWM:")


def rss_mb(pid: int | str = "self") -> float | None:
    """Resident set size now (``VmRSS``), MB."""
    return _status_mb(pid, "VmRSS:")


def _status_mb(pid: int | str, key: str) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


# ------------------------------------------------------------------------------------------- worker
class _Worker:
    """One worker process's agents: data loaded once, one MQTT loop, one workspace model."""

    def __init__(self, job: WorkerJob, conn: Connection) -> None:
        from edge_agent.startup import client_data, data_bytes, load_partition_and_dataset
        from protocols.mqtt_mux import MuxLoop

        self.job, self.conn = job, conn
        self.partition, self.dataset = load_partition_and_dataset(
            Path(job.partition), job.dataset, Path(job.root) if job.root else None
        )
        self.local = {cid: client_data(self.dataset, self.partition, cid) for cid in job.cids}
        self.nbytes = {cid: data_bytes(self.dataset, d) for cid, d in self.local.items()}
        self.global_test = self._global_test() if job.global_testset else None
        self.base_rss = rss_mb()  # torch, the dataset and the clients' data: before any connection
        self.loop = MuxLoop(job.url, protocol="3.1.1" if job.protocol == "3.1.1" else "5",
                            connect_rate=job.connect_rate, connect_timeout=job.connect_timeout,
                            name="agents-mqtt")
        self.model: Any = None  # the shared workspace, built from the first RunSpec
        self.model_spec: Any = None
        self._checked: dict[tuple[str, int], Any] = {}
        self.started = 0
        self.failure: str | None = None
        self.transports: list[Any] = []

    def _global_test(self) -> Any:
        import numpy as np
        import torch

        from fedcmd_core.strategies import ClientData

        everyone = torch.from_numpy(np.concatenate(self.partition.test)).long()
        x, y = self.dataset.x[everyone], self.dataset.y[everyone]
        return ClientData(x[:0], y[:0], x, y)

    def check(self, raw: Any, input_shape: tuple[int, ...], nbytes: int, profile: Any) -> Any:
        """edge_agent.compat.check_run, once per distinct (spec, data size): it builds a model on the meta
        device, ~ms each, which 5,000 agents would pay 5,000 times for the same answer."""
        from edge_agent.compat import check_run

        key = (json.dumps(raw, sort_keys=True, default=str), nbytes)
        if key not in self._checked:
            self._checked[key] = check_run(raw, input_shape, nbytes, profile)
        return self._checked[key]

    def start_agents(self) -> None:
        from edge_agent.startup import parse_status, run_description
        from protocols.mqtt_mux import MuxClient
        from protocols.topics import presence_payload, presence_topic, status_topic

        for cid in self.job.cids:
            will = (presence_topic(self.job.fleet, cid), presence_payload(cid, "offline"), True)
            transport = MuxClient(self.loop, f"{self.job.fleet}-agent-{cid}", will=will)
            status = status_topic(self.job.fleet)

            def on_status(topic: str, payload: bytes, cid: int = cid, transport: Any = transport) -> None:
                doc = parse_status(payload)
                run = run_description(doc) if doc is not None else None
                if run is not None and transport.started_agent is None:
                    self._start_agent(cid, transport, run)

            transport.started_agent = None
            transport.subscribe(status, on_status)
            self.transports.append(transport)
            self.loop.add(transport)

    def _start_agent(self, cid: int, transport: Any, run: Any) -> None:
        """The device start-up of edge_agent/startup.py, with this worker's shared data and workspace."""
        from typing import cast

        from cloud.sim.attacks import MaliciousClient
        from edge_agent.agent import Agent
        from edge_agent.compat import Incompatible
        from edge_agent.startup import build_device, refuse
        from fedcmd_core.strategies import ClientStrategy, ModelSpec
        from protocols.topics import presence_topic, status_topic

        local = self.local[cid]
        try:
            if self.model is None:
                spec, _ = self.check(run, self.dataset.input_shape, self.nbytes[cid], None)
                self.model = spec.build_model()
                self.model_spec = ModelSpec.from_model(self.model)
            built = build_device(run, cid, self.dataset.input_shape, local, self.nbytes[cid], None, model=self.model,
                                 model_spec=self.model_spec, eval_data=self.global_test, check=self.check)
        except Incompatible as e:
            refuse(transport, self.job.fleet, cid, str(e))
            self.failure = f"agent {cid} cannot serve the coordinator's run: {e}"
            return
        client = built.client
        if cid in self.job.attackers:
            job = self.job
            client = cast(ClientStrategy, MaliciousClient(client, job.attack, job.attack_scale, job.seed))
        state_dir = Path(self.job.state_dir) if self.job.state_dir else None
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True)
        agent = Agent(transport, self.job.fleet, cid, client, state_dir=state_dir)
        transport.unsubscribe(status_topic(self.job.fleet))
        transport.started_agent = agent
        # agent.announce("online") without waiting for the broker's PUBACK (thousands of agents start here):
        # the birth for reconnects, then the retained presence, behind the subscriptions on this connection
        presence = (presence_topic(self.job.fleet, cid), agent.presence("online"), True)
        transport.set_birth(presence)
        transport.publish_nowait(*presence)
        self.started += 1

    def serve(self) -> None:
        next_report = 0.0
        ready_sent = False

        def done() -> bool:
            nonlocal next_report, ready_sent
            if self.failure is not None:
                return True
            now = time.monotonic()
            if now >= next_report:
                next_report = now + PROGRESS_EVERY_S
                if not ready_sent:
                    self._send("progress", connected=self.loop.connected, started=self.started)
                if self.started == len(self.job.cids) and not ready_sent:
                    ready_sent = True
                    self._send("ready", base_rss_mb=self.base_rss, ready_rss_mb=rss_mb(), agents=self.started)
            return self.conn.poll()  # the parent says stop (or is gone: EOF)

        self.loop.serve(done)
        if self.failure is not None:
            raise RuntimeError(self.failure)

    def _send(self, kind: str, **values: Any) -> None:
        try:
            self.conn.send((kind, values))
        except (OSError, EOFError, BrokenPipeError):
            pass  # the parent is gone: nothing to tell


def _worker(job_json: str, conn: Connection, own_process: bool = True) -> None:
    """A worker process: builds its agents as devices do and serves them until told to stop.
    ``own_process=False`` runs it on a thread of another process (tests): no exit at the end."""
    import torch

    from protocols.transport import TransportError

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    job = WorkerJob(**json.loads(job_json))
    worker: _Worker | None = None
    code = 0
    try:
        worker = _Worker(job, conn)
        worker.start_agents()
        worker.serve()
    except (TransportError, RuntimeError, ValueError, OSError) as e:  # one line for the parent, no traceback
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        try:
            conn.send(("error", {"text": first}))
        except (OSError, EOFError):
            pass
        print(f"agent worker: {first}", file=sys.stderr)
        code = WORKER_UNAVAILABLE
    finally:
        if worker is not None:
            for t in worker.transports:
                agent = t.started_agent
                if agent is not None and t.connected:
                    try:
                        agent.announce("offline")  # a clean disconnect does not fire the last will
                    except Exception:
                        pass
            worker.loop.close()
        # Nothing is left to flush: skip the interpreter's teardown (torch's takes seconds on a busy machine),
        # so the parent's join returns as soon as the connections are closed.
        if own_process:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


# ------------------------------------------------------------------------------------------- parent
class _Fleet:
    """The parent's view of its workers: progress, readiness, and the first failure."""

    def __init__(self, groups: list[list[int]]) -> None:
        self.groups = groups
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        self.progress: list[dict[str, Any]] = []
        self.ready: list[dict[str, Any] | None] = []
        self.errors: list[str | None] = []
        self._next = 0.0
        self.stopping = False
        self.show: Callable[[], None] = lambda: None  # the start-up progress line

    def add(self, proc: Any, conn: Connection) -> None:
        self.procs.append(proc)
        self.conns.append(conn)
        self.progress.append({})
        self.ready.append(None)
        self.errors.append(None)

    def poll(self) -> None:
        """Read what the workers said; raise FleetFailed for the first that died or failed."""
        for i, conn in enumerate(self.conns):
            try:
                while conn.poll():
                    kind, values = conn.recv()
                    if kind == "progress":
                        self.progress[i] = values
                    elif kind == "ready":
                        self.ready[i] = values
                    elif kind == "error":
                        self.errors[i] = str(values.get("text", ""))[:500]
            except (EOFError, OSError):
                pass
        if self.stopping:
            return
        for i, proc in enumerate(self.procs):
            if self.errors[i] is not None or proc.exitcode is not None:
                raise FleetFailed(self._why(i))

    def _why(self, i: int) -> str:
        proc, group = self.procs[i], self.groups[i]
        who = f"agent worker {i + 1} of {len(self.procs)} (pid {proc.pid}, {len(group)} agents)"
        if self.errors[i]:
            return f"fleet simulation stopped: {who}: {self.errors[i]}"
        code = proc.exitcode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"fleet simulation stopped: {who} was killed by {name}"
        return f"fleet simulation stopped: {who} exited with code {code}"

    def watch(self) -> None:
        """Called inside every wait of the coordinator (throttled)."""
        now = time.monotonic()
        if now >= self._next:
            self._next = now + WATCH_EVERY_S
            self.poll()
            if not self.all_ready():
                self.show()

    def all_ready(self) -> bool:
        return all(r is not None for r in self.ready)

    def counts(self) -> tuple[int, int]:
        pairs = list(zip(self.ready, self.progress))
        connected = sum(r["agents"] if r else p.get("connected", 0) for r, p in pairs)
        started = sum(r["agents"] if r else p.get("started", 0) for r, p in pairs)
        return connected, started


class WatchedTransport(Transport):
    """The coordinator's transport, with the workers watched inside every wait: a dead worker raises
    FleetFailed out of the round loop instead of leaving it waiting for agents that will never answer."""

    def __init__(self, inner: Any, fleet: _Fleet) -> None:
        self.inner, self.fleet = inner, fleet

    @property  # type: ignore[override]
    def reconnects(self) -> int:
        return int(self.inner.reconnects)

    def __getattr__(self, name: str) -> Any:  # stats, dropped, rejected, ...: the inner transport's
        return getattr(self.inner, name)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.inner.publish(topic, payload, retain)

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        self.inner.subscribe(topic_filter, handler)

    def run_until(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        def watched() -> bool:
            self.fleet.watch()
            return done()

        return bool(self.inner.run_until(watched, timeout))

    def close(self) -> None:
        self.inner.close()


def publish_run_description(transport: Transport, p: Prepared) -> None:
    """The retained status a waiting coordinator publishes, with the RunSpec the agents start up from.

    Published here, before the coordinator of ``run_coordinator`` exists: its own statuses (from the
    first round on) replace it, once every agent has started."""
    from protocols.topics import status_topic

    status = {"state": "waiting", "fleet": FLEET, "next_round": 0, "global_epoch": p.cfg.global_epoch,
              "online": 0, "run": p.spec.model_dump(mode="json")}
    transport.publish(status_topic(FLEET), json.dumps(status).encode(), retain=True)


def _registration_progress(fleet: _Fleet, n: int) -> Callable[[], None]:
    """A progress line on stderr while the agents connect and start (a terminal only)."""
    if not sys.stderr.isatty():
        return lambda: None
    state = {"next": 0.0}

    def show() -> None:
        now = time.monotonic()
        if now >= state["next"]:
            state["next"] = now + 0.5
            connected, started = fleet.counts()
            print(f"\ragents: {connected}/{n} connected, {started}/{n} started", end="", file=sys.stderr, flush=True)

    return show


def run_mqtt_simulation(
    p: Prepared,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    started: float | None = None,
    stats_out: dict[str, Any] | None = None,
    events: Any = None,
) -> SimulationResult:
    """The run with its agents in worker processes; ``events``: the coordinator's event stream (watchers)."""
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
    groups = [g for g in (list(range(n))[w::workers] for w in range(workers)) if g]
    ctx = mp.get_context("spawn")  # no fork after torch and paho threads exist
    tmp = tempfile.TemporaryDirectory(prefix="fedcmd-fleet-")
    fleet = _Fleet(groups)
    procs, conns = fleet.procs, fleet.conns
    try:
        partition = cfg.partition
        if partition is None:  # made in this process: the workers read it as a device reads its --data
            partition = Path(tmp.name) / "partition.npz"
            p.partition.save(partition)
        publish_run_description(transport, p)
        for g in groups:
            job = WorkerJob(
                url=url, protocol=transport.protocol, fleet=FLEET, cids=g, dataset=cfg.dataset,
                partition=str(partition), root=str(cfg.root) if cfg.root else None,
                state_dir=str(cfg.state_dir) if cfg.state_dir else None, global_testset=cfg.global_testset,
                attackers=list(p.attackers), attack=cfg.attack, attack_scale=cfg.attack_scale, seed=cfg.seed,
            )
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(json.dumps(asdict(job)), child_end), daemon=True)
            proc.start()
            child_end.close()
            fleet.add(proc, parent_end)
        fleet.show = _registration_progress(fleet, n)
        extra = {"events": events} if events is not None else {}
        wait = max(120.0, n / 20)  # ~500 agents a second per worker start up here; 20 a second is slow
        try:
            result = run_coordinator(p, WatchedTransport(transport, fleet), on_round, on_start, started,
                                     registration_timeout=wait, **extra)
        except RuntimeError as e:
            if "came online" not in str(e):
                raise
            fleet.poll()
            connected, begun = fleet.counts()
            raise FleetFailed(f"fleet simulation stopped: {e} within {wait:.0f} s (the workers had {connected} "
                              f"connected and {begun} started; a slow or overloaded machine?)") from None
        if sys.stderr.isatty():
            print(file=sys.stderr)
        if stats_out is not None:
            fleet.poll()
            rounds = max(1, len(result.records))
            peaks = [peak_rss_mb(proc.pid) for proc in procs if proc.pid is not None]  # alive: not stopped yet
            stats_out.update(
                workers=len(procs),
                worker_peak_rss_mb=[x for x in peaks if x is not None],
                worker_ready=[r for r in fleet.ready if r is not None],
                messages_per_round=(transport.stats["messages_out"] + transport.stats["messages_in"]) / rounds,
                chunks_per_round=(transport.stats["chunks_out"] + transport.stats["chunks_in"]) / rounds,
            )
        return result
    finally:
        fleet.stopping = True
        for conn in conns:
            try:
                conn.send(("stop", {}))
            except (OSError, EOFError, BrokenPipeError):
                pass
        deadline = time.monotonic() + (15 if sys.exc_info()[0] is None else 3)  # failing: no long goodbyes
        for proc in procs:
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(5)
        transport.close()
        tmp.cleanup()
        if broker is not None:
            broker.stop()
