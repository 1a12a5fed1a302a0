"""``fedcmd simulate --jobs N``: a round's clients trained in N forked worker processes, bit for bit as one.

The coordinator runs in this process, unchanged, over :class:`PoolTransport`: a task it publishes goes to
an idle worker (largest client first), and the answers come back onto the in-process bus in the order the
tasks were published, so the coordinator sees exactly the sequence of messages ``--jobs 1`` gives it. A
worker is forked after the data, the model and every agent are built: it shares their pages, loads nothing,
imports nothing. Each client's state (its strategy's state, the agent's cached answers and counters)
lives in this process and travels with a task to a worker that does not hold its latest copy, and back
with the answer; task frames and state arrays travel through shared memory (``shm_channel.py``). The RNG
streams are per (seed, round, client) and every worker uses the same number of torch threads as
``--jobs 1``, so which process trains a client changes nothing. A relay round (one task at a time) gets
no parallel training, only its evaluation rounds run in parallel.

A worker that dies (killed, out of memory) fails the run at once with one line (:class:`WorkerDied`),
never a hang; workers die with this process (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from cloud.config import Unavailable
from protocols.memory import MemoryTransport
from protocols.topics import matches, parse_client_topic
from protocols.transport import Handler, Transport

if TYPE_CHECKING:
    from cloud.service.coordinator import RoundRecord
    from cloud.sim.setup import Prepared, SimulationResult
    from edge_agent.agent import Agent

log = logging.getLogger("fedcmd.pool")

# Agent fields that change with its tasks; with the strategy's state they are a client's whole state.
AGENT_FIELDS = ("answers", "tasks_done", "resent", "failed", "health", "reason", "_retry_at")
Message = tuple[str, bytes, bool]  # (topic, payload, retain)


class WorkerDied(Unavailable):
    """A client worker process ended during the run (exit 3: worth a retry)."""


def free_cores() -> int:
    """Cores this process may use that other processes are not already keeping busy (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]  # runnable processes, averaged over the last minute
    except OSError:
        busy = 0.0
    return max(1, min(cores, cores - int(busy + 0.5) + 1))  # +1: the calling process is one of the busy


def resolve_jobs(requested: int, tasks: int) -> int:
    """``--jobs``: 0 means the free cores; never more processes than there is work for."""
    jobs = requested if requested > 0 else free_cores()
    return max(1, min(jobs, tasks))


class Capture(Transport):
    """What the agents of one process publish, kept for the parent to replay in task order."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.sent.append((topic, bytes(payload), retain))

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        pass  # tasks reach agents through AgentHost.run, not a subscription

    def run_until(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        return done()

    def take(self) -> list[Message]:
        out, self.sent = self.sent, []
        return out


def export_state(agent: Agent) -> dict[str, Any]:
    state: dict[str, Any] = {"strategy": agent.strategy.state_dict()}
    state.update({name: getattr(agent, name) for name in AGENT_FIELDS})
    poisoned = getattr(agent.strategy, "poisoned", None)  # MaliciousClient's count (tests read it)
    if isinstance(poisoned, int):
        state["poisoned"] = poisoned
    return state


def import_state(agent: Agent, state: dict[str, Any]) -> None:
    agent.strategy.load_state_dict(state["strategy"])
    for name in AGENT_FIELDS:
        setattr(agent, name, state[name])
    if "poisoned" in state:
        agent.strategy.poisoned = state["poisoned"]


class AgentHost:
    """Every agent of the run, in one process; runs one task of one client and returns what it published."""

    def __init__(self, agents: dict[int, Agent], capture: Capture) -> None:
        self.agents = agents
        self.capture = capture

    def run(self, cid: int, topic: str, payload: bytes) -> list[Message]:
        self.capture.take()
        self.agents[cid]._on_task(topic, payload)
        return self.capture.take()


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)


def _serve(conn: Connection, inbox: Any, outbox: Any, host: AgentHost, threads: int, parent: int) -> None:
    """A worker: take (client, task, state) from the parent, run it, answer (messages, state)."""
    _die_with_parent()
    if os.getppid() != parent:
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    import torch

    torch.set_num_threads(threads)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        if msg[0] == "stop":
            break
        _, seq, cid, topic, meta, spans = msg
        try:
            payload, state = inbox.unpack(meta, spans)
            if state is not None:
                import_state(host.agents[cid], state)
            sent = host.run(cid, topic, bytes(payload))
            answer = ([(t, pickle.PickleBuffer(p), r) for t, p, r in sent], export_state(host.agents[cid]))
            out_meta, out_spans = outbox.pack(answer)
            conn.send(("done", seq, out_meta, out_spans))
        except Exception as e:  # a bug, not a device's failure (the agent catches those): report it
            conn.send(("error", seq, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    conn.close()


class _Worker:
    def __init__(self, index: int, host: AgentHost, threads: int, buffer_bytes: int) -> None:
        from cloud.sim.shm_channel import SharedBuffer

        self.index = index
        self.inbox = SharedBuffer(buffer_bytes)  # parent -> worker
        self.outbox = SharedBuffer(buffer_bytes)  # worker -> parent
        self.conn, child = mp.Pipe(duplex=True)
        ctx = mp.get_context("fork")  # shares the built agents and data; see the module docstring
        self.proc = ctx.Process(target=_serve, args=(child, self.inbox, self.outbox, host, threads, os.getpid()),
                                name=f"fedcmd-client-worker-{index}", daemon=True)
        self.proc.start()
        child.close()
        self.busy: tuple[int, int] | None = None  # (seq, cid) in flight
        self.tasks = 0
        self.fresh: dict[int, int] = {}  # client -> version of its state this worker holds

    def died(self, cid: int) -> WorkerDied:
        self.proc.join(timeout=1.0)
        code = self.proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return WorkerDied(f"client worker {self.index} (pid {self.proc.pid}) died ({how}) while training "
                          f"client {cid}; no run folder was written")

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
        except OSError:
            pass
        self.proc.join(timeout=5.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5.0)
        self.conn.close()
        self.inbox.close()
        self.outbox.close()


class PoolTransport(MemoryTransport):
    """The in-process bus, with tasks to agents carried out by worker processes (see the module docstring)."""

    def __init__(self, fleet: str, host: AgentHost, workers: list[_Worker], cost: Callable[[int], float]) -> None:
        super().__init__()
        self._tasks = f"fedcmd/{fleet}/client/+/task"
        self.host = host  # this process's copy of every agent: the authoritative client states
        self.workers = workers
        self.cost = cost
        self._seq = 0
        self._pending: list[tuple[int, int, str, bytes]] = []  # (seq, cid, topic, payload)
        self._done: dict[int, list[Message]] = {}
        self._next = 0  # the next task (by seq) whose answers go on the bus
        self.version: dict[int, int] = {}
        self.moved_states = 0  # client states sent to a worker that did not hold them

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        if not retain and matches(self._tasks, topic):
            self.bytes_published += len(payload)
            _, cid, _ = parse_client_topic(topic)
            self._pending.append((self._seq, cid, topic, bytes(payload)))
            self._seq += 1
            return
        super().publish(topic, payload, retain)

    # ------------------------------------------------------------------------------ scheduling
    def _dispatch(self) -> None:
        for worker in self.workers:
            if worker.busy is not None or not self._pending:
                continue
            best = max(range(len(self._pending)), key=lambda i: (self.cost(self._pending[i][1]), -i))
            seq, cid, topic, payload = self._pending.pop(best)
            version = self.version.get(cid, 0)
            state = None
            if worker.fresh.get(cid) != version:
                state = export_state(self.host.agents[cid])
                self.moved_states += 1
            meta, spans = worker.inbox.pack((pickle.PickleBuffer(payload), state))
            try:
                worker.conn.send(("task", seq, cid, topic, meta, spans))
            except OSError:
                raise worker.died(cid) from None
            worker.busy = (seq, cid)

    def _receive(self, worker: _Worker) -> None:
        assert worker.busy is not None
        seq, cid = worker.busy
        try:
            msg = worker.conn.recv()
        except (EOFError, OSError):
            raise worker.died(cid) from None
        worker.busy = None
        worker.tasks += 1
        if msg[0] == "error":
            raise RuntimeError(f"client worker {worker.index} failed on client {cid}: {msg[2]}")
        sent, state = worker.outbox.unpack(msg[2], msg[3])
        import_state(self.host.agents[cid], state)
        self.version[cid] = self.version.get(cid, 0) + 1
        worker.fresh[cid] = self.version[cid]
        self._done[seq] = [(t, bytes(p), r) for t, p, r in sent]

    def _release(self) -> None:
        while self._next in self._done:
            for topic, payload, retain in self._done.pop(self._next):
                super().publish(topic, payload, retain)
            self._next += 1

    def run_until(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        while not done():
            self._dispatch()
            busy = [w for w in self.workers if w.busy is not None]
            ready = wait([w.conn for w in busy], timeout=0) if busy else []
            for w in busy:
                if w.conn in ready:
                    self._receive(w)
            self._dispatch()
            self._release()
            if self._queue:
                self._deliver_one()
                continue
            busy = [w for w in self.workers if w.busy is not None]
            if not busy:
                return done()  # nothing queued, nothing running: nothing more will come
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return done()
            wait([w.conn for w in busy], timeout=left)
        return True

    def _deliver_one(self) -> None:
        topic, payload, only = self._queue.popleft()
        if only is not None:
            only(topic, payload)
            return
        for topic_filter, handler in list(self._subs):
            if matches(topic_filter, topic):
                handler(topic, payload)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()


def run_parallel(
    p: Prepared,
    jobs: int,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    started: float | None = None,
    stats_out: dict[str, Any] | None = None,
    **coordinator_options: Any,
) -> SimulationResult:
    """Run the simulation with ``jobs`` (>= 2) client worker processes; the result equals ``--jobs 1``'s."""
    from cloud.sim.setup import FLEET, make_agent, run_coordinator
    from fedcmd_core.params import model_arrays

    capture = Capture()
    agents = {cid: make_agent(p, capture, cid) for cid in range(p.partition.num_clients)}
    for agent in agents.values():
        agent.announce()
    announced = capture.take()
    host = AgentHost(agents, capture)
    # Room for a task (the model, or a few models: FedFomo sends M peers) and a client's state both ways.
    model_bytes = sum(a.nbytes for a in model_arrays(p.model).values())
    buffer_bytes = 16 * model_bytes + (4 << 20)  # pages are only allocated where written
    sizes = [len(t) for t in p.partition.train]
    workers: list[_Worker] = []
    transport: PoolTransport | None = None
    try:
        for i in range(jobs):
            workers.append(_Worker(i, host, p.cfg.threads, buffer_bytes))
        transport = PoolTransport(FLEET, host, workers, cost=lambda cid: sizes[cid])
        for topic, payload, retain in announced:
            transport.publish(topic, payload, retain)
        log.info("training clients in %d worker processes", jobs)
        result = run_coordinator(p, transport, on_round, on_start, started, **coordinator_options)
        if stats_out is not None:
            from cloud.sim.fleet import peak_rss_mb

            stats_out.update(
                workers=jobs, tasks_per_worker=[w.tasks for w in workers], moved_states=transport.moved_states,
                worker_pids=[w.proc.pid for w in workers],
                worker_peak_rss_mb=[peak_rss_mb(w.proc.pid or 0) for w in workers],
            )
        return result
    finally:
        for worker in workers:
            worker.stop()
