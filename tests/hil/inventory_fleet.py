"""The fleet of an inventory (``pytest --fleet fleet.toml``): real devices already running their agents
(e.g. under systemd), reached through the fleet's broker, commands on them through ``ssh <device.ssh>``.

The suite runs its own coordinator on the fleet from ``--fleet-cloud-config`` (the fleet's cloud.toml:
broker, credentials, [run]); stop the fleet's own coordinator service meanwhile (one client id each).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud.deploy.inventory import load_inventory
from hil.coordinator import CoordinatorRun, serve_config
from hil.fleet import Device, FleetUnderTest, Runner
from hil.watch import Credentials, Watcher
from protocols.mqtt import TlsConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REMOTE_TMP = "/tmp/fedcmd-hil"


def _ssh(destination: str) -> Runner:
    def run(argv: Sequence[str], input: bytes | None, timeout: float) -> subprocess.CompletedProcess[bytes]:
        # BatchMode: a test must fail on a missing key, not hang at a password prompt.
        return subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", destination,
                               shlex.join(argv)], input=input, capture_output=True, timeout=timeout)

    return run


def _credentials(cloud: dict[str, Any]) -> Credentials:
    password = Path(cloud["password_file"]).read_text().strip() if cloud.get("password_file") else None
    tls = TlsConfig(cloud["ca"], cloud.get("cert"), cloud.get("key")) if cloud.get("ca") else None
    return Credentials(cloud.get("username"), password, tls)


@dataclass
class InventoryFleet(FleetUnderTest):
    cloud: dict[str, Any] | None = None
    broker_restart: str | None = None
    _runs: list[CoordinatorRun] = field(default_factory=list)

    @classmethod
    def start(cls, inventory: Path, cloud_config: Path | None, broker_restart: str | None,
              edge_cmd: str) -> InventoryFleet:
        inv = load_inventory(inventory)
        cloud = tomllib.loads(cloud_config.read_text()) if cloud_config else None
        url = cloud.get("broker", inv.fleet.broker) if cloud else inv.fleet.broker
        watcher = Watcher(url, inv.fleet.name, _credentials(cloud) if cloud else Credentials())
        devices = [
            Device(d.id, d.profile, inv.fleet.state_dir, _ssh(d.ssh) if d.ssh else None,
                   f"device {d.id} has no `ssh` in {inventory}: commands cannot be run on it")
            for d in inv.device
        ]
        fleet = cls("inventory", inv.fleet.name, url, devices, watcher, (cloud or {}).get("run", {}),
                    shlex.split(edge_cmd), cloud=cloud, broker_restart=broker_restart)
        fleet.report.append(f"inventory fleet {inv.fleet.name} from {inventory}: {len(devices)} devices, broker {url}")
        fleet.report.append("limits: whatever the devices themselves enforce (not set by the suite)")
        return fleet

    def unsupported(self, what: str) -> str | None:
        return {
            "coordinator": None if self.cloud else (
                "starting a coordinator on a real fleet needs --fleet-cloud-config CLOUD.toml "
                "(the fleet's coordinator config: broker, credentials, [run])"),
            "broker_restart": None if self.broker_restart else (
                "restarting a real fleet's broker needs --fleet-broker-restart CMD "
                "(e.g. 'ssh broker sudo systemctl restart mosquitto')"),
            "link": "a real device's link cannot be cut from the test machine (the namespace fleet covers this)",
            "netns": "this check runs on the plugin's namespace devices only (run the suite without --fleet)",
        }.get(what)

    def coordinator(self, workdir: Path, rounds: int, **settings: Any) -> CoordinatorRun:
        self.require("coordinator")
        assert self.cloud is not None
        base = {**self.cloud, "fleet": self.name, "join_ratio": 1.0, "wait_clients": len(self.devices)}
        self.watcher.forget_status()
        run = CoordinatorRun(serve_config(base, workdir, rounds, **settings), workdir)
        self._runs.append(run)
        return run

    def restart_broker(self) -> None:
        self.require("broker_restart")
        assert self.broker_restart is not None
        subprocess.run(self.broker_restart, shell=True, check=True, timeout=120)
        self.broker_restarts += 1

    def set_link(self, device: Device, up: bool) -> None:
        self.require("link")

    def put_file(self, device: Device, local: Path) -> str:
        remote = f"{REMOTE_TMP}/{local.name}"
        proc = device.run(["sh", "-c", f"mkdir -p {REMOTE_TMP} && cat > {shlex.quote(remote)}"], local.read_bytes())
        assert proc.returncode == 0, f"copying {local} to device {device.id}: {proc.stderr.decode()[-2000:]}"
        return remote

    def close(self) -> None:
        for run in self._runs:
            run.kill()
        self.watcher.close()
