"""mosquitto inside the broker namespace, listening on the bridge address the devices dial.

``protocols.broker.start_broker`` always listens on 127.0.0.1 and checks readiness there, from the
calling namespace, so it cannot serve devices in other namespaces. This writes the same settings
(``max_queued_messages 0``, ``persistence false``, ``user root`` as root, the 1 MiB packet limit: see
protocols/broker.py and DESIGN.md §6) with the bridge address as the listener, and checks readiness
through the uplink.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from hil.netns import exec_argv, tied
from protocols.broker import MAX_PACKET_SIZE, Broker, BrokerError, mosquitto_path


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class NamespaceMosquitto(Broker):
    """A :class:`protocols.broker.Broker` (``url``, ``stop()``, ``restart()``) run in namespace ``ns``."""

    kind = "mosquitto"

    def __init__(self, ns: str, host: str, workdir: Path, port: int = 1883) -> None:
        super().__init__(port)
        exe = mosquitto_path()
        if exe is None:
            raise BrokerError("mosquitto is not installed (apt-get install -y mosquitto mosquitto-clients)")
        self.host, self.ns, self.executable = host, ns, exe
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        lines = [
            f"listener {port} {host}",
            "allow_anonymous true",  # the namespace fleet is private; ACLs are tested in test_security.py
            "max_queued_messages 0",  # unlimited: the default 1000 drops QoS 1 bursts silently
            "max_inflight_messages 0",
            f"max_packet_size {MAX_PACKET_SIZE}",
            "persistence false",  # a restart loses sessions and retained messages, as on a bare broker
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to user 'mosquitto'
        self.config_path.write_text("\n".join(lines) + "\n")
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 15.0) -> None:
        if self.running:
            return
        assert self.log_path is not None
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(tied(exec_argv(self.ns, [self.executable, "-c", str(self.config_path)])),
                                          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                raise BrokerError(f"mosquitto in {self.ns} exited with {self._proc.returncode}: {self.log_tail()}")
            if _listening(self.host, self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"mosquitto in {self.ns} did not listen on {self.url} within {timeout} s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:] if self.log_path else ""
        except OSError:
            return ""
