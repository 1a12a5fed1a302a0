"""The fleet the plugin makes itself when no ``--fleet`` is given: mosquitto in a broker namespace, one
``fedcmd-edge run`` agent per device namespace, each under its profile's CPU and memory limits.

Profiles: a torch agent here needs ~900 MB RSS (the CUDA build of torch, see edge_agent/profiles.py), so
the devices get profiles whose budgets hold that (jetson-orin 4096 MB, x86 8192 MB, jetson-nano 2048 MB);
an rpi4 budget (1536 MB) would hold it too, but its runtime overhead is sized for the CPU build.
"""

from __future__ import annotations

import os
import signal
import subprocess
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hil import limits, netns
from hil.coordinator import BIN, NETNS_RUN, CoordinatorRun, serve_config
from hil.fleet import Device, FleetUnderTest, Runner
from hil.limits import Confinement
from hil.netns import Topology, exec_argv, tied
from hil.ns_broker import NamespaceMosquitto
from hil.watch import Credentials, Watcher

FLEET = "hil"
DATASET = "mnist5k"
PROFILES = ("jetson-orin", "x86", "jetson-nano")


class LimitsWarning(UserWarning):
    """A profile limit this machine cannot enforce on the namespace devices."""


def _runner(ns: str, confinement: Confinement) -> Runner:
    def run(argv: Sequence[str], input: bytes | None, timeout: float) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(confinement.wrap(exec_argv(ns, argv)), input=input, capture_output=True, timeout=timeout)

    return run


def _tail(path: Path | None, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:] if path else ""
    except OSError:
        return ""


@dataclass
class NetnsFleet(FleetUnderTest):
    topo: Topology | None = None
    broker: NamespaceMosquitto | None = None
    partition: Path | None = None
    workdir: Path | None = None
    extra: list[Confinement] = field(default_factory=list)
    backend: Any = None
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _runs: list[CoordinatorRun] = field(default_factory=list)

    @classmethod
    def start(cls, workdir: Path, partition: Path, profiles: Sequence[str] = PROFILES, **fields: Any) -> NetnsFleet:
        """``fields``: further dataclass fields of a subclass (hil.arm_fleet.MixedFleet)."""
        removed = netns.remove_leftovers()
        backend, notes = limits.choose_backend()
        removed += limits.remove_leftovers(backend)
        topo = netns.create(len(profiles))
        confinements: list[Confinement] = []
        broker = watcher = None
        try:
            broker = NamespaceMosquitto(topo.broker_ns, topo.broker_ip, workdir / "broker")
            watcher = Watcher(broker.url, FLEET, Credentials())
            devices = []
            for k, profile in enumerate(profiles):
                conf = backend.confine(f"{limits.PREFIX}{os.getpid()}-d{k}", limits.budget_for(profile))
                confinements.append(conf)
                devices.append(
                    Device(
                        k,
                        profile,
                        str(workdir / f"state-{k}"),
                        _runner(topo.device_ns[k], conf),
                        ns=topo.device_ns[k],
                        confinement=conf,
                        log_path=workdir / f"agent-{k}.log",
                    )
                )
        except BaseException:
            if watcher is not None:
                watcher.close()
            if broker is not None:
                broker.stop()
            netns.destroy(topo)
            for c in confinements:
                c.remove()
            raise
        fleet = cls(
            "netns",
            FLEET,
            broker.url,
            devices,
            watcher,
            NETNS_RUN,
            [str(BIN / "fedcmd-edge")],
            topo=topo,
            broker=broker,
            partition=partition,
            workdir=workdir,
            backend=backend,
            **fields,
        )
        fleet._describe(removed, notes)
        try:
            fleet._start_agents()
        except BaseException:
            fleet.close()
            raise
        return fleet

    def _describe(self, removed: list[str], notes: list[str]) -> None:
        assert self.topo is not None
        self.report.append(
            f"namespace fleet {self.topo.tag}: broker {self.broker_url}, "
            f"{len(self.devices)} devices on a bridge in {self.topo.broker_ns}"
        )
        for d in self.devices:
            assert d.confinement is not None
            self.report.append(f"device {d.id} ({d.profile}, netns {d.ns}): {d.confinement.describe()}")
            if not any(e.startswith("memory") for e in d.confinement.enforced):
                warnings.warn(
                    LimitsWarning(
                        f"device {d.id} ({d.profile}): its {d.profile} memory budget is NOT "
                        f"enforced here ({d.confinement.mechanism})"
                    ),
                    stacklevel=2,
                )
        self.report.extend(f"not used: {n}" for n in notes)
        self.report.append(
            f"agents train with 1 torch thread: {len(self.devices)} devices share this machine's {os.cpu_count()} cores"
        )
        if removed:
            self.report.append(f"removed leftovers of dead runs: {', '.join(removed)}")

    def _agent_argv(self, d: Device) -> list[str]:
        """The agent's command line on device ``d`` (run inside its namespace, under its confinement)."""
        assert self.partition is not None
        return [
            *self.edge_cmd,
            "run",
            "--broker",
            self.broker_url,
            "--client-id",
            str(d.id),
            "--data",
            str(self.partition),
            "-d",
            DATASET,
            "--state-dir",
            d.state_dir,
            "--fleet",
            self.name,
            "--profile",
            d.profile,
            "--threads",
            "1",
            "--wait",
            "900",
        ]

    def _start_agents(self) -> None:
        for d in self.devices:
            assert d.confinement is not None and d.ns is not None and d.log_path is not None
            argv = self._agent_argv(d)
            with open(d.log_path, "ab") as log:
                proc = subprocess.Popen(
                    d.confinement.wrap(tied(exec_argv(d.ns, argv))),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            self._procs.append(proc)
            d.pid = proc.pid  # sh, setpriv and ip netns exec all exec: this is the agent's pid
        # Until `ip netns exec` has run, an agent's pid is in the root namespace (`ip netns identify` said
        # "" to a test that ran at once): hand out the fleet only when every agent is in its namespace.
        for d in self.devices:
            assert d.pid is not None and d.ns is not None
            if not netns.wait_in_namespace(d.pid, d.ns):
                raise RuntimeError(f"agent {d.id} did not enter netns {d.ns}:\n{self.explain()}")

    # ------------------------------------------------------------------------------------ operations
    def coordinator(self, workdir: Path, rounds: int, **settings: Any) -> CoordinatorRun:
        assert self.topo is not None
        base = {
            "fleet": self.name,
            "broker": self.broker_url,
            "join_ratio": 1.0,
            "min_clients": 1,
            "round_deadline": 30.0 * self.pace,
            "wait_clients": len(self.devices),
            "registration_timeout": 300.0 * self.pace,
            "run": self.run_spec,
        }
        self.watcher.forget_status()
        run = CoordinatorRun(
            serve_config(base, workdir, rounds, **settings), workdir, prefix=tied(exec_argv(self.topo.broker_ns, []))
        )
        self._runs.append(run)
        return run

    def restart_broker(self) -> None:
        assert self.broker is not None
        self.broker.restart()
        self.broker_restarts += 1

    def set_link(self, device: Device, up: bool) -> None:
        assert self.topo is not None
        self.topo.set_link(device.id, up)

    def put_file(self, device: Device, local: Path) -> str:
        return str(local)  # namespaces share the file system

    def sample_inputs(self, device: Device, n: int) -> np.ndarray:
        import torch

        from fedcmd_core.data import Partition, load_dataset

        assert self.partition is not None
        ds = load_dataset(DATASET)
        idx = Partition.load(self.partition, ds).test[device.id][:n]
        return ds.x[torch.from_numpy(idx)].numpy().astype(np.float32)  # the device's own test rows

    def extra_confinement(self, label: str, budget: limits.Budget) -> Confinement:
        """A confinement besides the devices' (removed with the fleet)."""
        conf = self.backend.confine(f"{limits.PREFIX}{os.getpid()}-{label}", budget)
        self.extra.append(conf)
        return conf

    def explain(self) -> str:
        parts = []
        for d in self.devices:
            state = "running" if d.pid and netns.running(d.pid) else "NOT running"
            parts.append(f"--- agent {d.id} ({state}) {d.log_path}:\n{_tail(d.log_path)}")
        if self.broker is not None:
            parts.append(f"--- broker {self.broker.log_path}:\n{self.broker.log_tail(1500)}")
        return "\n".join(parts)

    def close(self) -> None:
        """Stop everything this fleet started and remove its namespaces and cgroups (idempotent)."""
        for run in self._runs:
            run.kill()
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the agent announces "offline" and exits
        for proc in self._procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._procs.clear()
        self.watcher.close()
        if self.broker is not None:
            self.broker.stop()
        if self.topo is not None:
            netns.destroy(self.topo)
        for conf in [*(d.confinement for d in self.devices if d.confinement), *self.extra]:
            conf.remove()
