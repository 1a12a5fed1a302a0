"""The mixed-architecture namespace fleet of ``pytest -m hil --hil-arm`` (``make hil-arm``): two x86 devices
(profiles jetson-orin and x86, as in the default fleet) and an emulated Raspberry Pi 4 (aarch64, profile
rpi4), each in its own network namespace under its profile's limits.

The Pi is the cached Debian bookworm arm64 rootfs of :mod:`hil.arm_rootfs`, mounted for this session with
a private overlay, into which the current source's aarch64 wheel (built inside the rootfs) is installed.
It is set up and started the way deploy/README.md sets up a real Pi: ``deploy/rpi/install-agent.sh``
(``system`` + ``install`` when the cached layer was built, ``provision`` here), then the ``ExecStart=`` of
the agent unit that ``fedcmd deploy systemd`` renders for it, as its ``User=`` with its ``Environment=``,
plus ``--threads 1 --wait 900`` (the x86 agents' settings here: three devices share two cores).

A capture connection records the first task the Pi receives and its answer (raw frames), for the
aarch64-vs-x86 comparison in test_arm.py.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hil import arm_rootfs
from hil.coordinator import BIN
from hil.fleet import Device, Runner
from hil.limits import Confinement
from hil.netns import exec_argv
from hil.netns_fleet import DATASET, NetnsFleet
from hil.watch import Credentials, connect
from protocols.codec import DecodeError, decode
from protocols.topics import task_topic, update_topic

ARM_PROFILES = ("jetson-orin", "x86", "rpi4")
ARM_INDEX = 2  # the emulated Pi's device id
ARCH = "aarch64 (qemu user-mode, Debian bookworm arm64)"
PI_STATE = "/var/lib/fedcmd/state"  # the inventory default, as on a real Pi
PI_EDGE = f"{arm_rootfs.AGENT_PREFIX}/bin/fedcmd-edge"
PI_PYTHON = f"{arm_rootfs.AGENT_PREFIX}/bin/python"
# The Pi's round under emulation against an x86 agent's here (measured: see tests/hil/README.md)
PACE = 8.0


@dataclass
class Frame:
    kind: str  # "task" or "update"
    round: int
    task_kind: str  # "fit" / "evaluate"
    run: str
    raw: bytes


class ExchangeCapture:
    """A connection of its own (handlers on its own thread) keeping the first ``keep`` task and update
    frames of one device (bounded: later ones are counted, not kept)."""

    def __init__(self, url: str, fleet: str, client: int, keep: int = 4) -> None:
        self.frames: list[Frame] = []
        self.seen = 0
        self.keep = keep
        self._lock = threading.Lock()
        self._stop = False
        self.transport = connect(url, Credentials(), "capture")
        self.transport.subscribe(task_topic(fleet, client), lambda t, p: self._on("task", p))
        self.transport.subscribe(update_topic(fleet, client), lambda t, p: self._on("update", p))
        self._thread = threading.Thread(target=self._loop, name="hil-arm-capture", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        self.transport.run_until(lambda: self._stop, None)

    def _on(self, kind: str, payload: bytes) -> None:
        try:
            header, _ = decode(payload)
        except DecodeError:
            return
        with self._lock:
            self.seen += 1
            if len(self.frames) < self.keep:
                self.frames.append(Frame(kind, header.round, header.kind, header.run, payload))

    def first_exchange(self) -> tuple[Frame, Frame] | None:
        """The device's first task and the update that answered it, once both arrived."""
        with self._lock:
            frames = list(self.frames)
        tasks = [f for f in frames if f.kind == "task"]
        if not tasks:
            return None
        first = tasks[0]
        for f in frames:
            if f.kind == "update" and f.round == first.round and f.run == first.run and f.task_kind == first.task_kind:
                return first, f
        return None

    def close(self) -> None:
        self._stop = True
        self._thread.join(10)
        self.transport.close()


def render_unit(workdir: Path, broker_url: str, fleet: str, client_id: int, profile: str) -> dict[str, Any]:
    """``fedcmd deploy systemd`` for one Pi of this fleet: its ExecStart argv, User and Environment."""
    inventory = workdir / "pi-fleet.toml"
    inventory.write_text(
        f'[fleet]\nname = "{fleet}"\nbroker = "{broker_url}"\ndataset = "{DATASET}"\n'
        f'data = "/var/lib/fedcmd/partition.npz"\nstate_dir = "{PI_STATE}"\ntls = false\n\n'
        f'[[device]]\nid = {client_id}\nhost = "hil-pi"\nprofile = "{profile}"\n'
    )
    out = workdir / "units"
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run(
        [str(BIN / "fedcmd"), "deploy", "systemd", "--inventory", str(inventory), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"fedcmd deploy systemd failed: {proc.stdout}{proc.stderr}")
    unit = (out / "hil-pi" / "fedcmd-agent.service").read_text()
    found: dict[str, Any] = {"env": {}, "text": unit}
    for line in unit.splitlines():
        key, _, value = line.partition("=")
        if key == "ExecStart":
            found["argv"] = shlex.split(value)
        elif key == "User":
            found["user"] = value
        elif key == "Environment":
            found["env"].update(dict(w.split("=", 1) for w in shlex.split(value)))
        elif key == "MemoryMax":
            found["memory_max"] = value
    if "argv" not in found:
        raise RuntimeError(f"no ExecStart in the rendered unit:\n{unit}")
    return found


@dataclass
class MixedFleet(NetnsFleet):
    session: arm_rootfs.SessionRoot | None = None
    capture: ExchangeCapture | None = None
    unit: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start_mixed(cls, workdir: Path, partition: Path) -> MixedFleet:
        arm_rootfs.remove_leftover_sessions(workdir.parent.parent)
        session = arm_rootfs.SessionRoot(workdir / "pi")
        try:
            fleet = super().start(workdir, partition, ARM_PROFILES, session=session)
        except BaseException:
            session.close()
            raise
        assert isinstance(fleet, MixedFleet)
        fleet.pace = PACE
        fleet.report.append(f"rounds paced {PACE:g}x (deadlines, waits, round counts of the conformance tests)")
        return fleet

    @property
    def pi(self) -> Device:
        return self.devices[ARM_INDEX]

    def _pi_runner(self, ns: str, confinement: Confinement) -> Runner:
        assert self.session is not None
        session = self.session

        def run(argv: Sequence[str], input: bytes | None, timeout: float) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                confinement.wrap(exec_argv(ns, session.argv(argv))), input=input, capture_output=True, timeout=timeout
            )

        return run

    def _start_agents(self) -> None:
        assert self.session is not None and self.partition is not None and self.workdir is not None
        d = self.devices[ARM_INDEX]
        assert d.ns is not None and d.confinement is not None
        d.state_dir, d.edge_cmd, d.arch = PI_STATE, [PI_EDGE], ARCH
        d.runner = self._pi_runner(d.ns, d.confinement)
        # the guide's provisioning step, with the shared script (the anonymous test broker ignores the password)
        stage = self.session.path("/tmp/fedcmd-hil")
        stage.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.partition, stage / "partition.npz")
        (stage / "password").write_text("hil-anonymous\n")
        shutil.copy2(arm_rootfs.INSTALL_SCRIPT, stage / "install-agent.sh")
        proc = self.session.run(
            [
                "sh",
                "/tmp/fedcmd-hil/install-agent.sh",
                "provision",
                "/tmp/fedcmd-hil/partition.npz",
                "/tmp/fedcmd-hil/password",
            ],
            timeout=300,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"install-agent.sh provision failed: {proc.stderr.decode(errors='replace')}")
        self.unit = render_unit(self.workdir, self.broker_url, self.name, d.id, d.profile)
        self.capture = ExchangeCapture(self.broker_url, self.name, d.id)
        self.report.append(f"device {d.id} is {ARCH}: rootfs layers {', '.join(map(str, self.session.lowers))}")
        super()._start_agents()

    def _agent_argv(self, d: Device) -> list[str]:
        if d.id != ARM_INDEX:
            return super()._agent_argv(d)
        assert self.session is not None
        return self.session.argv(
            [*self.unit["argv"], "--threads", "1", "--wait", "900"], user=self.unit.get("user"), env=self.unit["env"]
        )

    def put_file(self, device: Device, local: Path) -> str:
        if device.id != ARM_INDEX:
            return super().put_file(device, local)
        assert self.session is not None
        inner = f"/tmp/fedcmd-hil/{local.name}"
        shutil.copy2(local, self.session.path(inner))
        return inner

    def explain(self) -> str:
        text = super().explain()
        if self.session is not None and self.session.log.exists():
            text += f"\n--- pi session {self.session.log}:\n{self.session.log.read_text(errors='replace')[-1500:]}"
        return text

    def close(self) -> None:
        if self.capture is not None:
            self.capture.close()
            self.capture = None
        super().close()
        if self.session is not None:
            self.session.close()
