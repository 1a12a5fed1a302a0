"""CPU and memory limits for a namespace device, from its profile: a cgroup per device where the kernel
lets us make one, else CPU affinity (taskset) alone. Whatever is used says what it enforces
(:attr:`Confinement.enforced`); nothing pretends.

Order of preference: cgroup v2 (``memory.max``, ``cpu.max``) where the unified hierarchy has the memory
and cpu controllers; cgroup v1 (``memory.limit_in_bytes``, ``cpu.cfs_quota_us``) where those hierarchies
are mounted and writable (hybrid hosts, e.g. this machine's Firecracker kernel); else ``taskset`` for
CPUs and no memory limit. A process joins its cgroup through a tiny ``sh`` wrapper that writes its own
pid into ``cgroup.procs`` and then execs the command (no ``preexec_fn`` in a threaded pytest process).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "fedcmd-hil-"
_MB = 1024 * 1024
_PERIOD_US = 100_000


@dataclass(frozen=True)
class Budget:
    """What a profile allows: ``cpus`` whole CPUs of this machine, ``memory_mb`` for the process tree."""

    cpus: int
    memory_mb: int
    asked_threads: int | None  # the profile's threads (None: every core), for the report


def budget_for(profile_name: str) -> Budget:
    from edge_agent.profiles import get_profile

    profile = get_profile(profile_name)
    host = os.cpu_count() or 1
    return Budget(min(profile.threads or host, host), profile.memory_mb, profile.threads)


@dataclass
class Confinement:
    """One device's limits. ``wrap(argv)`` runs a command under them."""

    name: str
    budget: Budget
    mechanism: str
    enforced: list[str]  # e.g. ["memory 4096 MB (memory.max)", "cpu 2 CPUs (cpu.max 200000 100000)"]
    procs_files: list[Path] = field(default_factory=list)
    cpu_list: str | None = None  # taskset fallback
    settings: dict[Path, str] = field(default_factory=dict)  # cgroup file -> the value written

    def wrap(self, argv: Sequence[str]) -> list[str]:
        if self.procs_files:
            joins = " && ".join(f"echo $$ > {shlex.quote(str(p))}" for p in self.procs_files)
            return ["sh", "-c", f'{joins} && exec "$@"', "confine", *argv]
        if self.cpu_list is not None:
            return ["taskset", "-c", self.cpu_list, *argv]
        return list(argv)

    def describe(self) -> str:
        threads = "all cores" if self.budget.asked_threads is None else f"{self.budget.asked_threads} threads"
        what = "; ".join(self.enforced) if self.enforced else "nothing enforced"
        note = " = every core here, so no CPU throttling" if self.budget.cpus >= (os.cpu_count() or 1) else ""
        return f"{self.mechanism}: {what}{note} (profile asks {threads}, {self.budget.memory_mb} MB)"

    def holds(self, pid: int) -> bool:
        """Whether process ``pid`` runs under this confinement (cgroup membership or CPU affinity)."""
        if self.procs_files:
            return all(str(pid) in p.read_text().split() for p in self.procs_files)
        if self.cpu_list is not None:
            return os.sched_getaffinity(pid) == set(range(self.budget.cpus))
        return False

    def problems(self) -> list[str]:
        """Cgroup settings that do not read back as written (the kernel refused or changed them)."""
        out = []
        for path, value in self.settings.items():
            got = path.read_text().strip() if path.exists() else "<missing>"
            if got != value:
                out.append(f"{path}: {got!r}, written {value!r}")
        return out

    def remove(self) -> None:
        for procs in self.procs_files:
            _remove_cgroup(procs.parent)


def _remove_cgroup(path: Path) -> None:
    """Kill what is left in the cgroup (ours by name) and remove it; a dying process holds it briefly."""
    end = time.monotonic() + 5
    while path.is_dir():
        try:
            for pid in (path / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            path.rmdir()
        except OSError:
            if time.monotonic() > end:
                return
            time.sleep(0.05)


def _mounts() -> list[tuple[str, str, str, str]]:
    """(mount point, root within the hierarchy, fs type, super options) of every cgroup mount."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            out.append((fields[4], fields[3], tail[0], tail[2]))
    return out


def _own_path(controller: str | None) -> str | None:
    """This process's cgroup path in the hierarchy of ``controller`` (None: the v2 unified hierarchy)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if (controller is None and names == "") or (controller is not None and controller in names.split(",")):
            return path
    return None


def _write(path: Path, value: str) -> None:
    path.write_text(value)


class _Backend:
    mechanism = ""
    bases: tuple[Path, ...] = ()  # where this backend makes its cgroups

    def confine(self, name: str, budget: Budget) -> Confinement:
        raise NotImplementedError


class CgroupV2(_Backend):
    mechanism = "cgroup v2"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bases = (root,)

    @classmethod
    def probe(cls) -> tuple[CgroupV2 | None, str]:
        for mount, hroot, fstype, _ in _mounts():
            if fstype != "cgroup2":
                continue
            root = Path(mount)
            available = (root / "cgroup.controllers").read_text().split()
            if not {"memory", "cpu"} <= set(available):
                return None, f"cgroup v2 at {mount} lacks memory/cpu (it has: {' '.join(available) or 'none'})"
            # Children of the hierarchy's root: the root alone may hold processes and delegate controllers.
            if hroot != "/":
                return None, f"cgroup v2 at {mount} is a delegated subtree ({hroot}); not its root"
            enabled = (root / "cgroup.subtree_control").read_text().split()
            try:
                missing = [f"+{c}" for c in ("memory", "cpu") if c not in enabled]
                if missing:
                    _write(root / "cgroup.subtree_control", " ".join(missing))
            except OSError as e:
                return None, f"cannot enable memory/cpu in {root}/cgroup.subtree_control: {e}"
            return cls(root), ""
        return None, "no cgroup v2 hierarchy mounted"

    def confine(self, name: str, budget: Budget) -> Confinement:
        path = self.root / name
        path.mkdir(exist_ok=True)
        quota = budget.cpus * _PERIOD_US
        settings = {path / "memory.max": str(budget.memory_mb * _MB), path / "cpu.max": f"{quota} {_PERIOD_US}"}
        if (path / "memory.swap.max").exists():
            settings[path / "memory.swap.max"] = "0"  # a limit that swaps instead of failing is no limit
        for file, value in settings.items():
            _write(file, value)
        return Confinement(name, budget, self.mechanism, [
            f"memory {budget.memory_mb} MB (memory.max)", f"cpu {budget.cpus} CPUs (cpu.max {quota} {_PERIOD_US})",
        ], [path / "cgroup.procs"], settings=settings)


class CgroupV1(_Backend):
    mechanism = "cgroup v1"

    def __init__(self, memory: Path, cpu: Path) -> None:
        self.memory, self.cpu = memory, cpu
        self.bases = (memory, cpu)

    @classmethod
    def probe(cls) -> tuple[CgroupV1 | None, str]:
        found: dict[str, Path] = {}
        for mount, hroot, fstype, options in _mounts():
            for controller in ("memory", "cpu"):
                if fstype == "cgroup" and controller in options.split(","):
                    own = _own_path(controller)
                    if own is None:
                        continue
                    rel = os.path.relpath(own, hroot) if own.startswith(hroot) else "."
                    found[controller] = (Path(mount) / rel).resolve()
        if set(found) != {"memory", "cpu"}:
            return None, "no cgroup v1 memory and cpu hierarchies mounted"
        for controller, path in found.items():
            if not os.access(path, os.W_OK):
                return None, f"cgroup v1 {controller} hierarchy {path} is not writable"
        return cls(found["memory"], found["cpu"]), ""

    def confine(self, name: str, budget: Budget) -> Confinement:
        mem, cpu = self.memory / name, self.cpu / name
        mem.mkdir(exist_ok=True)
        cpu.mkdir(exist_ok=True)
        quota = budget.cpus * _PERIOD_US
        settings = {mem / "memory.limit_in_bytes": str(budget.memory_mb * _MB),
                    cpu / "cpu.cfs_period_us": str(_PERIOD_US), cpu / "cpu.cfs_quota_us": str(quota)}
        for file, value in settings.items():
            _write(file, value)
        if (mem / "memory.memsw.limit_in_bytes").exists():
            try:  # memory+swap: no swapping past the limit either (refused where swap accounting is off)
                _write(mem / "memory.memsw.limit_in_bytes", str(budget.memory_mb * _MB))
            except OSError:
                pass
        return Confinement(name, budget, self.mechanism, [
            f"memory {budget.memory_mb} MB (memory.limit_in_bytes)",
            f"cpu {budget.cpus} CPUs (cpu.cfs_quota_us {quota} / cfs_period_us {_PERIOD_US})",
        ], [mem / "cgroup.procs", cpu / "cgroup.procs"], settings=settings)


class Affinity(_Backend):
    mechanism = "CPU affinity (taskset), no memory limit"

    def confine(self, name: str, budget: Budget) -> Confinement:
        if shutil.which("taskset") is None:
            return Confinement(name, budget, "no limits (no cgroups, no taskset)", [])
        cpus = f"0-{budget.cpus - 1}" if budget.cpus > 1 else "0"
        return Confinement(name, budget, self.mechanism, [f"cpu {budget.cpus} CPUs (taskset -c {cpus})"],
                           cpu_list=cpus)


def choose_backend() -> tuple[_Backend, list[str]]:
    """The best mechanism this machine offers, and why the better ones were not used."""
    notes: list[str] = []
    for cls in (CgroupV2, CgroupV1):
        try:
            backend, why = cls.probe()
        except OSError as e:
            backend, why = None, f"{cls.mechanism}: {e}"
        if backend is not None:
            return backend, notes
        notes.append(why)
    return Affinity(), notes


def remove_leftovers(backend: _Backend) -> list[str]:
    """Remove cgroups of dead pytest runs (``fedcmd-hil-<pid>-...`` whose pid is gone)."""
    removed: list[str] = []
    for base in backend.bases:
        for path in base.glob(f"{PREFIX}*"):
            pid = path.name[len(PREFIX):].split("-", 1)[0]
            if path.is_dir() and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                _remove_cgroup(path)
                removed.append(str(path))
    return removed
