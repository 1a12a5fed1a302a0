"""The edge agent: answers tasks from the coordinator with its client-side strategy.

It talks only through a :class:`protocols.transport.Transport`, so the same class serves the
in-process simulation and a device on an MQTT broker.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedcmd_core.state_tree import load_state_file, save_state_file
from fedcmd_core.strategies import ClientStrategy, Task, Update
from protocols.codec import DecodeError, Header, decode, encode
from protocols.topics import PresenceState, presence_payload, presence_topic, task_topic, update_topic
from protocols.transport import Transport

log = logging.getLogger("fedcmd.agent")


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
    ) -> None:
        self.transport = transport
        self.fleet = fleet
        self.client_id = client_id
        self.strategy = strategy
        self.tasks_done = 0
        self.profile = profile  # reported at registration so the coordinator knows what it is sampling
        self.export_onnx = export_onnx  # personalized model re-exported here after every fit
        # Personal layers, BN statistics and optimiser state survive a restart of the device.
        self.state_file = state_dir / f"client-{client_id}.state.safetensors" if state_dir else None
        if self.state_file is not None and self.state_file.is_file():
            values, _ = load_state_file(self.state_file)
            strategy.load_state_dict(values)
            log.info("client %d: restored state from %s", client_id, self.state_file)
        transport.subscribe(task_topic(fleet, client_id), self._on_task)

    def presence(self, state: PresenceState) -> bytes:
        info = {"profile": self.profile} if self.profile is not None else {}
        return presence_payload(self.client_id, state, **info)

    def announce(self, state: PresenceState = "online") -> None:
        """Retained presence: how the coordinator learns this device can be sampled."""
        self.transport.publish(presence_topic(self.fleet, self.client_id), self.presence(state), retain=True)

    def _on_task(self, topic: str, payload: bytes) -> None:
        try:
            header, arrays = decode(payload)
        except DecodeError as e:
            log.warning("client %d: rejected task frame: %s", self.client_id, e)
            return
        if header.type != "task" or header.fleet != self.fleet or header.client != self.client_id:
            log.warning("client %d: rejected task meant for %s/%s", self.client_id, header.fleet, header.client)
            return
        task = Task(header.round, "evaluate" if header.kind == "evaluate" else "fit", arrays, header.payload)
        update = self.strategy.evaluate(task) if task.kind == "evaluate" else self.strategy.fit(task)
        self.tasks_done += 1
        if task.kind == "fit" and self.state_file is not None:
            save_state_file(self.state_file, self.strategy.state_dict(), {"client": str(self.client_id)})
        self.transport.publish(update_topic(self.fleet, self.client_id), self.encode_update(task, update))
        if task.kind == "fit" and self.export_onnx is not None:
            self._export(task.round)

    def _export(self, rnd: int) -> None:
        # After the update is on its way: the export (~0.2 s for LeNet-5) must not delay the round.
        from edge_agent.onnx_export import export_strategy

        try:
            export_strategy(self.strategy, self.export_onnx, {"round": str(rnd)})
        except Exception as e:  # a failed export must not stop the device answering tasks
            log.warning("client %d: ONNX export to %s failed: %s", self.client_id, self.export_onnx, e)

    def encode_update(self, task: Task, update: Update) -> bytes:
        header = Header(
            type="update",
            fleet=self.fleet,
            round=update.round,
            client=self.client_id,
            kind=task.kind,
            num_samples=update.num_samples,
            payload={"metrics": update.metrics, "info": update.info},
        )
        # The coordinator chooses how updates travel (fp16/int8 quantisation halves/quarters the bytes).
        return encode(header, update.arrays, codec=task.config.get("update_codec", "none"))
