"""The test's own MQTT connection: the coordinator's retained status, the devices' retained presence, and
(where the broker allows it) the tasks sent to a device. Same approach as tests/test_fleet_faults.py
(its ``_status``/``_wait``), as one long-lived connection that reconnects across broker restarts."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from typing import Any

from protocols.codec import DecodeError, decode
from protocols.mqtt import MqttTransport, TlsConfig
from protocols.topics import parse_client_topic, presence_filter, status_topic, task_topic

_ids = count()


@dataclass(frozen=True)
class Credentials:
    """How the test authenticates to the broker (a real fleet's coordinator credentials; none in netns)."""

    username: str | None = None
    password: str | None = None
    tls: TlsConfig | None = None


def connect(url: str, creds: Credentials, role: str) -> MqttTransport:
    """A new MQTT client with a unique id (two clients with one id would keep kicking each other off)."""
    client_id = f"hil-{role}-{os.getpid()}-{next(_ids)}"
    return MqttTransport(url, client_id, username=creds.username, password=creds.password, tls=creds.tls)


class Watcher:
    def __init__(self, url: str, fleet: str, creds: Credentials) -> None:
        self.fleet, self.url, self.creds = fleet, url, creds
        self.status: dict[str, Any] = {}
        self.presence: dict[int, dict[str, Any]] = {}
        self.tasks: dict[int, list[int]] = {}  # client -> rounds of the tasks it was sent
        self.transport = connect(url, creds, "watch")
        self.transport.subscribe(status_topic(fleet), self._on_status)
        self.transport.subscribe(presence_filter(fleet), self._on_presence)

    def _on_status(self, topic: str, payload: bytes) -> None:
        self.status = json.loads(payload)

    def _on_presence(self, topic: str, payload: bytes) -> None:
        _, cid, _ = parse_client_topic(topic)
        self.presence[cid] = json.loads(payload)

    def watch_tasks(self, cid: int) -> None:
        """Record the round of every task sent to ``cid`` (needs read access to its task topic)."""
        self.tasks.setdefault(cid, [])

        def on_task(topic: str, payload: bytes) -> None:
            try:
                self.tasks[cid].append(decode(payload)[0].round)
            except DecodeError:
                pass

        self.transport.subscribe(task_topic(self.fleet, cid), on_task)

    def poll(self, seconds: float = 0.2) -> None:
        """Take in what arrived (handlers run only here, on the test's thread)."""
        self.transport.run_until(lambda: False, seconds)

    def forget_status(self) -> None:
        """Drop the last status seen (a new coordinator is starting; the old one's is stale)."""
        self.poll(0.3)
        self.status = {}

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str,
             explain: Callable[[], str] | None = None) -> None:
        """Poll until ``predicate()``; AssertionError naming ``what`` and the last status otherwise."""
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                extra = f"\n{explain()}" if explain else ""
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; "
                                     f"last status {self.status}{extra}")
            self.poll(0.2)

    def retained_presence(self, ids: set[int], timeout: float) -> dict[int, dict[str, Any]]:
        """What the broker retains now on the presence topics (a fresh subscription replays it), waiting up to
        ``timeout`` seconds for every one of ``ids``."""
        found: dict[int, dict[str, Any]] = {}
        t = connect(self.url, self.creds, "presence")
        try:
            t.subscribe(presence_filter(self.fleet),
                        lambda topic, payload: found.update({parse_client_topic(topic)[1]: json.loads(payload)}))
            t.run_until(lambda: ids <= set(found), timeout)
        finally:
            t.close()
        return found

    def next_round(self) -> int:
        return int(self.status.get("next_round", 0))

    def close(self) -> None:
        self.transport.close()
