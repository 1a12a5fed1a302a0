"""The namespace devices run under their profiles' limits, the kernel enforces the memory limit, and an
agent refuses a run its profile's memory budget cannot hold. (Namespace fleet only: on a real fleet the
devices' own limits apply, and the refusal check would publish a scratch run on the real broker.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hil.fleet import FleetUnderTest
from hil.limits import Budget
from hil.watch import connect

pytestmark = [pytest.mark.hil, pytest.mark.timeout(300)]


def test_agents_run_in_their_namespace_under_their_profile_limits(fleet: FleetUnderTest) -> None:
    fleet.require("netns")
    for d in fleet.devices:
        assert d.pid is not None and d.confinement is not None and d.ns is not None
        assert os.path.exists(f"/proc/{d.pid}"), f"agent {d.id} is not running:\n{fleet.explain()}"
        ns = subprocess.run(["ip", "netns", "identify", str(d.pid)], capture_output=True, text=True).stdout.strip()
        assert ns == d.ns, f"agent {d.id} runs in netns {ns!r}, not {d.ns}"
        if d.confinement.enforced:
            assert d.confinement.holds(d.pid), f"agent {d.id} is not under {d.confinement.describe()}"
        assert d.confinement.problems() == [], d.confinement.describe()


def test_memory_limit_is_enforced_by_the_kernel(fleet: FleetUnderTest) -> None:
    fleet.require("netns")
    conf = fleet.extra_confinement("oom", Budget(1, 64, 1))  # type: ignore[attr-defined]
    if not any(e.startswith("memory") for e in conf.enforced):
        pytest.skip(f"memory limits cannot be enforced on this machine ({conf.mechanism})")
    fits = subprocess.run(conf.wrap([sys.executable, "-c", "b = b'x' * (8 << 20)"]), capture_output=True, timeout=60)
    assert fits.returncode == 0, fits.stderr.decode()[-2000:]
    # Touch every page: 256 MB written under a 64 MB limit must be OOM-killed, not swapped or allowed.
    over = subprocess.run(conf.wrap([sys.executable, "-c", "b = b'x' * (256 << 20)"]), capture_output=True, timeout=60)
    assert over.returncode == -9, f"256 MB under a 64 MB limit: exit {over.returncode} {over.stderr[-500:]!r}"


def _too_big_run(budget_mb: int) -> dict[str, object]:
    """A run (ResNet-18, a large batch) whose estimate exceeds ``budget_mb`` before any data is counted."""
    from edge_agent.profiles import RUNTIME_OVERHEAD_CUDA_BUILD_MB, estimate_for_model
    from fedcmd_core.models import build_model

    model = build_model("res18", (1, 28, 28), 10, seed=0)
    batch = 64
    while (
        estimate_for_model(
            model, (1, 28, 28), batch, 0, momentum=False, runtime_mb=RUNTIME_OVERHEAD_CUDA_BUILD_MB
        ).total_mb
        < 1.2 * budget_mb
    ):
        batch *= 2
    return {
        "algo": "fedavg",
        "model": "res18",
        "input_shape": [1, 28, 28],
        "num_classes": 10,
        "num_clients": 50,
        "global_epoch": 1,
        "batch_size": batch,
    }


def test_agent_refuses_a_run_its_memory_budget_cannot_hold(fleet: FleetUnderTest, tmp_path: Path) -> None:
    fleet.require("netns")
    from edge_agent.profiles import PROFILES
    from protocols.topics import status_topic

    smallest = min(PROFILES.values(), key=lambda p: p.memory_mb)
    scratch = f"hil-refusal-{os.getpid()}"  # its own fleet name: the suite's agents never see this run
    probe = connect(fleet.broker_url, fleet.watcher.creds, "refusal")
    try:
        status = {"state": "waiting", "fleet": scratch, "run": _too_big_run(smallest.memory_mb)}
        probe.publish(status_topic(scratch), json.dumps(status).encode(), retain=True)
    finally:
        probe.close()
    device = fleet.devices[0]
    proc = device.run(
        [
            *fleet.edge_cmd,
            "run",
            "--broker",
            fleet.broker_url,
            "--client-id",
            "0",
            "--data",
            str(fleet.partition),
            "-d",
            "mnist5k",  # type: ignore[attr-defined]
            "--state-dir",
            str(tmp_path / "state"),
            "--fleet",
            scratch,
            "--profile",
            smallest.name,
            "--wait",
            "60",
        ],
        timeout=180,
    )
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, f"the agent did not refuse (exit {proc.returncode}):\n{err[-3000:]}"
    assert f"profile {smallest.name} has a {smallest.memory_mb} MB memory budget" in " ".join(err.split()), err
    assert not (tmp_path / "state" / "runspec.json").exists(), "the agent went on after refusing"
