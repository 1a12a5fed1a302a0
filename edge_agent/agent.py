"""The edge agent: answers tasks from the coordinator with its client-side strategy.

It talks only through a :class:`protocols.transport.Transport`, so the same class serves the
in-process simulation and a device on an MQTT broker.

Exactly-once rounds: the agent keeps the encoded update of its last answered task per kind ("fit",
"evaluate"), keyed by the task's (run, round). A coordinator restarted from its checkpoint sends the
same task again; the agent re-publishes that answer unchanged instead of training a second time (its
state is already past that round). The answers live in the same atomic state write as the strategy
state, so what is on disk is always a state and the answers that state produced.

Health: a state write that fails (disk full, read-only) does not silence the device: the update still
goes out, presence says ``unhealthy`` with the reason, and the write is retried every ``retry_every``
seconds (and on the next task) until it works and the device is ``online`` again. A state file that
cannot be read at start is moved aside and the device starts fresh from the cloud's model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedcmd_core.state_tree import StateError, load_state_file, save_state_file
from fedcmd_core.strategies import ClientStrategy, Task, Update
from protocols.codec import DecodeError, Header, decode, encode
from protocols.topics import PresenceState, presence_payload, presence_topic, task_topic, update_topic
from protocols.transport import Transport

log = logging.getLogger("fedcmd.agent")

ANSWERS = "__agent_answers__"  # reserved top-level entry of the state file: the cached update frames
ANSWER_KEYS = "agent_answers"  # metadata: {kind: [run, round]} of those frames
RETRY_S = 30.0
Kind = str  # "fit" | "evaluate"
AnswerKey = tuple[str, int]  # (run, round)


class Agent:
    def __init__(
        self,
        transport: Transport,
        fleet: str,
        client_id: int,
        strategy: ClientStrategy,
        state_dir: Path | None = None,
        profile: str | None = None,
        export_onnx: Path | None = None,
        retry_every: float = RETRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport = transport
        self.fleet = fleet
        self.client_id = client_id
        self.strategy = strategy
        self.tasks_done = 0  # tasks trained or evaluated (a resent answer is not counted)
        self.resent = 0  # tasks answered from the cache
        self.failed = 0  # tasks that raised while training or evaluating (not answered; state rolled back)
        self.profile = profile  # reported at registration so the coordinator knows what it is sampling
        self.export_onnx = export_onnx  # personalized model re-exported here after every fit
        self.answers: dict[Kind, tuple[AnswerKey, bytes]] = {}
        self.health: PresenceState = "online"
        self.reason: str | None = None  # why the device is unhealthy
        self.retry_every = retry_every
        self.clock = clock
        self._retry_at = math.inf  # when the failed state write is tried again (inf: nothing unsaved)
        # Personal layers, BN statistics, optimiser state and the last answers survive a restart.
        self.state_file = state_dir / f"client-{client_id}.state.safetensors" if state_dir else None
        if self.state_file is not None:
            self._remove_temp_files(any_pid=True)  # left by a process killed mid-write
            self._restore()
        transport.subscribe(task_topic(fleet, client_id), self._on_task)

    # ----------------------------------------------------------------------------------- presence
    def presence(self, state: PresenceState) -> bytes:
        info: dict[str, str] = {"profile": self.profile} if self.profile is not None else {}
        if state == "unhealthy" and self.reason:
            info["reason"] = self.reason
        return presence_payload(self.client_id, state, **info)

    def announce(self, state: PresenceState | None = None) -> None:
        """Retained presence: how the coordinator learns this device can be sampled (default: its health).
        The birth message re-sent after a reconnect says the same, so a broker restart cannot turn an
        unhealthy device back into an online one."""
        state = state or self.health
        topic, payload = presence_topic(self.fleet, self.client_id), self.presence(state)
        set_birth = getattr(self.transport, "set_birth", None)  # MQTT only: in process nothing reconnects
        if set_birth is not None and state != "offline":
            set_birth((topic, payload, True))
        self.transport.publish(topic, payload, retain=True)

    # -------------------------------------------------------------------------------------- tasks
    def _on_task(self, topic: str, payload: bytes) -> None:
        try:
            header, arrays = decode(payload)
        except DecodeError as e:
            log.warning("client %d: rejected task frame: %s", self.client_id, e)
            return
        if header.type != "task" or header.fleet != self.fleet or header.client != self.client_id:
            log.warning("client %d: rejected task meant for %s/%s", self.client_id, header.fleet, header.client)
            return
        kind: Kind = "evaluate" if header.kind == "evaluate" else "fit"
        key: AnswerKey = (header.run, header.round)
        cached = self.answers.get(kind)
        # An empty run id cannot tell two runs apart: only a named run's task is answered from the cache.
        if header.run and cached is not None and cached[0] == key:
            log.info("client %d: %s task of round %d again: resending its answer", self.client_id, kind,
                     header.round + 1)
            self.resent += 1
            self._publish(cached[1])
            if math.isfinite(self._retry_at):  # a state write is still owed: try it now
                self._after_save(self.save())
            return
        task = Task(header.round, kind, arrays, header.payload)
        before = copy.deepcopy(self.strategy.state_dict())
        try:
            update = self.strategy.evaluate(task) if kind == "evaluate" else self.strategy.fit(task)
        except Exception as e:  # a task this device cannot carry out (e.g. a non-finite body): no answer, no crash
            self.strategy.load_state_dict(before)
            self.failed += 1
            log.warning("client %d: could not carry out the %s task of round %d: %s: %s", self.client_id, kind,
                        header.round + 1, type(e).__name__, e)
            return
        self.tasks_done += 1
        frame = self.encode_update(task, update, run=header.run)
        self.answers[kind] = (key, frame)
        # Saved before it is sent: an answer the coordinator may have seen is always one the disk holds.
        problem = self.save()
        self._publish(frame)
        self._after_save(problem)
        if kind == "fit" and self.export_onnx is not None:
            self._export(task.round)

    def _publish(self, frame: bytes) -> None:
        self.transport.publish(update_topic(self.fleet, self.client_id), frame)

    def _export(self, rnd: int) -> None:
        # After the update is on its way: the export (~0.2 s for LeNet-5) must not delay the round.
        from edge_agent.onnx_export import export_strategy

        try:
            export_strategy(self.strategy, self.export_onnx, {"round": str(rnd)})
        except Exception as e:  # a failed export must not stop the device answering tasks
            log.warning("client %d: ONNX export to %s failed: %s", self.client_id, self.export_onnx, e)

    def encode_update(self, task: Task, update: Update, run: str = "") -> bytes:
        header = Header(
            type="update",
            fleet=self.fleet,
            round=update.round,
            client=self.client_id,
            kind=task.kind,
            run=run,  # the coordinator takes only answers to the run it is running
            num_samples=update.num_samples,
            payload={"metrics": update.metrics, "info": update.info},
        )
        # The coordinator chooses how updates travel (fp16/int8 quantisation halves/quarters the bytes).
        return encode(header, update.arrays, codec=task.config.get("update_codec", "none"))

    # -------------------------------------------------------------------------------------- state
    def save(self) -> str | None:
        """Write the strategy state and the cached answers in one atomic write; the reason it failed, or
        None. A failed write is retried by :meth:`tick`."""
        if self.state_file is None:
            return None
        state = self.strategy.state_dict()
        if ANSWERS in state:
            raise StateError(f"strategy state uses the agent's reserved name {ANSWERS!r}")
        frames = {kind: np.frombuffer(frame, dtype=np.uint8) for kind, (_, frame) in self.answers.items()}
        keys = {kind: [run, rnd] for kind, ((run, rnd), _) in self.answers.items()}
        meta = {"client": str(self.client_id), ANSWER_KEYS: json.dumps(keys)}
        try:
            save_state_file(self.state_file, {**state, ANSWERS: frames}, meta)
        except OSError as e:
            self._remove_temp_files()
            self._retry_at = self.clock() + self.retry_every
            return f"state not saved: {e.strerror or e}"
        self._retry_at = math.inf
        return None

    def tick(self) -> bool:
        """Retry a failed state write when it is due; call it from the transport loop. Returns False, so
        ``run_until(lambda: agent.tick() or stopping)`` works."""
        if self.clock() >= self._retry_at:
            self._after_save(self.save())
        return False

    def _after_save(self, problem: str | None) -> None:
        """Presence follows the last state write: unhealthy (with why) while it fails, online once it works."""
        if problem is not None:
            self._set_unhealthy(problem)
        elif self.health == "unhealthy":
            self._set_online()

    def _set_unhealthy(self, reason: str) -> None:
        if self.health == "unhealthy" and reason == self.reason:
            return
        log.warning("client %d: unhealthy: %s (retrying every %.0f s)", self.client_id, reason, self.retry_every)
        self.health, self.reason = "unhealthy", reason
        self.announce()

    def _set_online(self) -> None:
        log.info("client %d: state written to %s again: online", self.client_id, self.state_file)
        self.health, self.reason = "online", None
        self.announce()

    def _restore(self) -> None:
        assert self.state_file is not None
        if not self.state_file.is_file():
            return
        before = dict(self.strategy.state_dict())
        try:
            values, meta = load_state_file(self.state_file)
            answers = _parse_answers(values.pop(ANSWERS, {}), meta.get(ANSWER_KEYS, "{}"))
            self.strategy.load_state_dict(values)
        except (StateError, ValueError, KeyError, TypeError, AttributeError) as e:
            self.strategy.load_state_dict(before)  # nothing half-loaded survives
            self._move_aside(str(e))
            return
        self.answers = answers
        log.info("client %d: restored state from %s", self.client_id, self.state_file)

    def _move_aside(self, why: str) -> None:
        assert self.state_file is not None
        aside = self.state_file.with_name(f"{self.state_file.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            os.replace(self.state_file, aside)
            where = f"moved it to {aside.name}"
        except OSError as e:
            where = f"could not move it aside ({e.strerror or e})"
        log.warning("client %d: unreadable state file %s (%s): %s; starting fresh from the cloud's model",
                    self.client_id, self.state_file, why[:200], where)

    def _remove_temp_files(self, any_pid: bool = False) -> None:
        # save_state_file writes ".<name>.tmp-<pid>[-<thread>]" next to the file, then renames it.
        assert self.state_file is not None
        stem = f".{self.state_file.name}.tmp-"
        patterns = [f"{stem}*"] if any_pid else [f"{stem}{os.getpid()}", f"{stem}{os.getpid()}-*"]
        try:
            for pattern in patterns:
                for tmp in self.state_file.parent.glob(pattern):
                    tmp.unlink(missing_ok=True)
        except OSError as e:
            log.warning("client %d: could not remove a temporary state file: %s", self.client_id, e)


def _parse_answers(frames: object, keys_json: str) -> dict[Kind, tuple[AnswerKey, bytes]]:
    """The cached answers of a state file: ``ValueError`` if the frames and their keys disagree."""
    keys = json.loads(keys_json)
    if not isinstance(frames, dict) or not isinstance(keys, dict) or set(frames) != set(keys):
        raise ValueError("cached answers and their keys do not match")
    out: dict[Kind, tuple[AnswerKey, bytes]] = {}
    for kind, frame in frames.items():
        run, rnd = keys[kind]
        if kind not in ("fit", "evaluate") or not isinstance(run, str) or not isinstance(rnd, int):
            raise ValueError(f"bad cached answer key {kind!r}: {keys[kind]!r}")
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 1:
            raise ValueError(f"cached {kind} answer is not a byte array")
        out[kind] = ((run, rnd), frame.tobytes())
    return out
