"""The "fleet under test" the conformance suite sees, whatever backs it: namespace devices made by the
plugin (:mod:`hil.netns_fleet`) or the devices of an inventory (:mod:`hil.inventory_fleet`).

An operation one kind of fleet cannot offer (cut a real device's link from the test machine, run a
command on a device without ssh) skips the test that asks for it, with the reason.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hil.coordinator import CoordinatorRun
from hil.limits import Confinement
from hil.watch import Watcher

Runner = Callable[[Sequence[str], bytes | None, float], subprocess.CompletedProcess[bytes]]


@dataclass
class Device:
    """One device: its fleet id, profile, state folder (a path on the device) and how to run a command there."""

    id: int
    profile: str
    state_dir: str
    runner: Runner | None = None
    no_runner_reason: str = ""
    edge_cmd: list[str] | None = None  # fedcmd-edge on this device, when it differs from the fleet's
    arch: str = ""  # e.g. "aarch64 (qemu user-mode)" for the emulated Pi; "" = this machine's
    # namespace devices only
    ns: str | None = None
    pid: int | None = None
    confinement: Confinement | None = None
    log_path: Path | None = None

    @property
    def model_path(self) -> str:
        return f"{self.state_dir}/model.onnx"  # the agent's default --onnx

    def run(self, argv: Sequence[str], input: bytes | None = None, timeout: float = 120.0
            ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` on the device (stdout/stderr captured; no check of the exit status)."""
        if self.runner is None:
            pytest.skip(self.no_runner_reason)
        return self.runner(argv, input, timeout)

    def __repr__(self) -> str:
        return f"<device {self.id} {self.profile}{' ' + self.arch.split()[0] if self.arch else ''}>"


@dataclass
class FleetUnderTest:
    """What every conformance test gets. Subclasses fill the fields and implement the operations."""

    mode: str  # "netns" or "inventory"
    name: str  # the fleet name (topic prefix)
    broker_url: str  # what the coordinator dials
    devices: list[Device]
    watcher: Watcher
    run_spec: dict[str, Any]  # the [run] table the coordinator serves
    edge_cmd: list[str]  # fedcmd-edge on the devices
    report: list[str] = field(default_factory=list)  # what the terminal summary says about this fleet
    broker_restarts: int = 0  # restart_broker() calls so far
    # How many times longer than the x86 namespace fleet's a round may take here (an emulated device trains
    # ~100x slower): the conformance tests scale their round deadlines, waits and round counts by it.
    pace: float = 1.0

    def unsupported(self, what: str) -> str | None:
        """Why this fleet cannot do ``what`` ("coordinator", "broker_restart", "link", "netns"); None if it can."""
        return None

    def require(self, *what: str) -> None:
        """Skip the calling test, before it starts anything, unless this fleet offers all of ``what``."""
        for w in what:
            reason = self.unsupported(w)
            if reason:
                pytest.skip(reason)

    def coordinator(self, workdir: Path, rounds: int, **settings: Any) -> CoordinatorRun:
        """Start ``fedcmd cloud serve`` for ``rounds`` rounds over every device (join_ratio 1)."""
        raise NotImplementedError

    def restart_broker(self) -> None:
        raise NotImplementedError

    def set_link(self, device: Device, up: bool) -> None:
        raise NotImplementedError

    def put_file(self, device: Device, local: Path) -> str:
        """Copy ``local`` onto the device; the path it has there."""
        raise NotImplementedError

    def sample_inputs(self, device: Device, n: int) -> np.ndarray:
        """``n`` inputs for ``device``'s model, float32 (N, C, H, W) as ``fedcmd-edge predict`` takes them."""
        shape = tuple(self.run_spec["input_shape"])
        return np.random.default_rng(device.id).standard_normal((n, *shape)).astype(np.float32)

    def explain(self) -> str:
        """Log tails worth reading when a test fails."""
        return ""

    def close(self) -> None:
        self.watcher.close()
