"""The namespace devices run under their profiles' limits, the kernel enforces the memory limit, and an
agent refuses a run its profile's memory budget cannot hold. (Namespace fleet only: on a real fleet the
devices' own limits apply, and the refusal check would publish a scratch run on the real broker.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hil import netns
from hil.fleet import FleetUnderTest
from hil.limits import Budget
from hil.netns import in_namespace, running
from hil.watch import connect

pytestmark = [pytest.mark.hil, pytest.mark.timeout(300)]


def _net_of(pid: int) -> str:
    try:
        return f"its /proc/{pid}/ns/net is {os.readlink(f'/proc/{pid}/ns/net')}"
    except OSError as e:
        return f"/proc/{pid}/ns/net: {e.strerror}"


def test_agents_run_in_their_namespace_under_their_profile_limits(fleet: FleetUnderTest) -> None:
    fleet.require("netns")
    for d in fleet.devices:
        assert d.pid is not None and d.confinement is not None and d.ns is not None
        # not os.path.exists(/proc/<pid>): true for a dead agent nobody reaped yet
        assert running(d.pid), f"agent {d.id} is not running:\n{fleet.explain()}"
        # not `ip netns identify`: it prints "" (and exits 0) for a process it cannot match or open
        assert in_namespace(d.pid, d.ns), f"agent {d.id} (pid {d.pid}) is not in netns {d.ns}: {_net_of(d.pid)}"
        if d.confinement.enforced:
            assert d.confinement.holds(d.pid), f"agent {d.id} is not under {d.confinement.describe()}"
        assert d.confinement.problems() == [], d.confinement.describe()


def test_namespace_checks_see_through_wrappers_and_dead_agents() -> None:
    """Why `ip netns identify` said "" for an agent (2 of 2 runs on one machine): an agent's pid sits in the
    root namespace until `ip netns exec` (behind sh and setpriv) has entered its own, a few ms after the
    fleet started it, and identify answers "" for a dead, unreaped pid too, whose /proc entry still exists."""
    why = netns.why_unavailable()
    if why is not None:
        pytest.skip(why)
    ns = f"{netns.PREFIX}{os.getpid()}probe"
    netns.ip("netns", "add", ns)
    try:
        chain = ["sh", "-c", 'exec "$@"', "confine", *netns.tied(netns.exec_argv(ns, ["sleep", "30"]))]
        proc = subprocess.Popen(chain)
        try:
            assert netns.wait_in_namespace(proc.pid, ns, timeout=30) and netns.running(proc.pid)
            assert not netns.in_namespace(os.getpid(), ns)
        finally:
            proc.kill()
            proc.wait()
        dead = subprocess.Popen(netns.exec_argv(ns, ["true"]))
        end = time.monotonic() + 10
        while netns.running(dead.pid) and time.monotonic() < end:
            time.sleep(0.01)
        assert os.path.exists(f"/proc/{dead.pid}")  # a zombie until reaped: the old liveness check said alive
        assert not netns.running(dead.pid) and not netns.in_namespace(dead.pid, ns)
        assert not netns.wait_in_namespace(dead.pid, ns, timeout=5)
        dead.wait()
    finally:
        netns.ip("netns", "del", ns, check=False)


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
