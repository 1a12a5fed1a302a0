"""Network namespaces for the namespace-backed fleet: one broker namespace, N device namespaces.

Topology (one bridge, so every party dials the broker at one address)::

    root ns                 broker ns  fh<pid>b                    device ns  fh<pid>d<k>
    fh<pid>u 10.x.y.254 --- uplink -+- br0 10.x.y.1 (mosquitto)
                                    +- vd<k> ------------------- eth0 10.x.y.(10+k)

Each device has its own veth pair into the bridge, so ``ip link set eth0 down`` in one device namespace
cuts that device alone. The uplink lets the test process itself reach the broker (status, presence).
Names carry the pid of the pytest process that made them: parallel runs do not collide, and a run
deletes what dead pids left behind (:func:`remove_leftovers`). A deleted namespace takes its veths with
it; the only interface in the root namespace is the uplink's end.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

PREFIX = "fh"  # fedcmd hil
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)(?:b|d\d+|u|probe)$")


class NetnsError(RuntimeError):
    """An ``ip`` command failed; the text has the command and its stderr."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc


def exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside namespace ``ns`` (ip netns exec execs it: the pid stays the command's)."""
    return ["ip", "netns", "exec", ns, *argv]


def tied(argv: Sequence[str]) -> list[str]:
    """``argv`` killed when the pytest process dies, even by SIGKILL (``setpriv --pdeathsig``; survives the
    execs of ``ip netns exec``). Without setpriv, the next run's :func:`remove_leftovers` cleans up."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", *argv] if setpriv else list(argv)


def why_unavailable() -> str | None:
    """Why this machine cannot make network namespaces (None when it can): tried for real, not guessed."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the hil suite as root, or against a real fleet with --fleet)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}probe"
    try:
        ip("netns", "add", probe)
        ip("-n", probe, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
    except (NetnsError, OSError, subprocess.TimeoutExpired) as e:
        return f"cannot create a network namespace with a veth pair here: {e}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


NETNS_RUN_DIR = "/var/run/netns"  # where ``ip netns add`` bind-mounts a namespace (iproute2's NETNS_RUN_DIR)


def running(pid: int) -> bool:
    """Whether ``pid`` runs: /proc/<pid> also exists for a process that died and was not reaped yet
    (a zombie, state Z), which has no namespaces left to look at."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]  # the field after "(comm)"; comm may hold spaces
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def in_namespace(pid: int, ns: str) -> bool:
    """Whether process ``pid`` is in network namespace ``ns``: its /proc/<pid>/ns/net is the namespace
    bind-mounted at /var/run/netns/<ns> (same nsfs device and inode; what ``ip netns identify`` compares,
    without its silent empty answer for a process that has not entered a namespace yet, or is gone)."""
    try:
        mine = os.stat(f"/proc/{pid}/ns/net")
        named = os.stat(f"{NETNS_RUN_DIR}/{ns}")
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino)


def wait_in_namespace(pid: int, ns: str, timeout: float = 30.0) -> bool:
    """Wait until ``pid`` has entered ``ns``; False when it died first or ``timeout`` passed.

    A command started as ``sh -c ... exec`` -> ``setpriv`` -> ``ip netns exec ns ...`` keeps its pid but
    sits in the parent's namespace for the first milliseconds, until ``ip netns exec`` has called setns."""
    end = time.monotonic() + timeout
    while not in_namespace(pid, ns):
        if not running(pid) or time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def kill_namespace_processes(ns: str) -> None:
    """SIGKILL whatever still runs in ``ns`` (our namespaces hold only our processes)."""
    pids = ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def remove_leftovers() -> list[str]:
    """Delete namespaces and uplinks named after pids that no longer run; returns what was removed."""
    removed: list[str] = []
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            kill_namespace_processes(name)
            ip("netns", "del", name, check=False)
            removed.append(name)
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        m = _NAME_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            ip("link", "del", name, check=False)
            removed.append(name)
    return removed


def _free_subnet(pid: int) -> ipaddress.IPv4Network:
    """A /24 in 10/8 that no address or route of the root namespace touches (derived from the pid)."""
    used = (
        ip("-4", "-o", "addr", "show", check=False).stdout
        + ip("-4", "route", "show", "table", "all", check=False).stdout
    )
    taken = [ipaddress.ip_network(w, strict=False) for w in re.findall(r"\b\d+\.\d+\.\d+\.\d+/\d+\b", used)]
    for step in range(4096):
        n = (pid + step * 7919) % (150 * 256)
        net = ipaddress.IPv4Network(f"10.{100 + n // 256}.{n % 256}.0/24")
        if not any(net.overlaps(t) for t in taken if t.prefixlen > 0):
            return net
    raise NetnsError("no free 10.x.y.0/24 subnet for the test network")


@dataclass
class Topology:
    """What :func:`create` made; :func:`destroy` removes all of it."""

    tag: str
    subnet: ipaddress.IPv4Network
    broker_ns: str
    device_ns: list[str]
    uplink: str

    @property
    def broker_ip(self) -> str:
        return str(self.subnet.network_address + 1)

    def device_ip(self, k: int) -> str:
        return str(self.subnet.network_address + 10 + k)

    @property
    def host_ip(self) -> str:
        return str(self.subnet.network_address + 254)

    def set_link(self, k: int, up: bool) -> None:
        """Bring device ``k``'s only link up or down (its route to the broker goes and comes with it)."""
        ip("-n", self.device_ns[k], "link", "set", "eth0", "up" if up else "down")


def create(n_devices: int, pid: int | None = None) -> Topology:
    """Broker namespace with a bridge, ``n_devices`` device namespaces, the uplink; cleaned up on failure."""
    pid = os.getpid() if pid is None else pid
    tag = f"{PREFIX}{pid}"
    topo = Topology(tag, _free_subnet(pid), f"{tag}b", [f"{tag}d{k}" for k in range(n_devices)], f"{tag}u")
    prefix = topo.subnet.prefixlen
    try:
        ip("netns", "add", topo.broker_ns)
        b = ["-n", topo.broker_ns]
        ip(*b, "link", "set", "lo", "up")
        ip(*b, "link", "add", "br0", "type", "bridge")
        ip(*b, "addr", "add", f"{topo.broker_ip}/{prefix}", "dev", "br0")
        ip(*b, "link", "set", "br0", "up")
        for k, ns in enumerate(topo.device_ns):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"vd{k}", "netns", topo.broker_ns)
            ip(*b, "link", "set", f"vd{k}", "master", "br0")
            ip(*b, "link", "set", f"vd{k}", "up")
            ip("-n", ns, "addr", "add", f"{topo.device_ip(k)}/{prefix}", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
        ip("link", "add", topo.uplink, "type", "veth", "peer", "name", "uplink", "netns", topo.broker_ns)
        ip(*b, "link", "set", "uplink", "master", "br0")
        ip(*b, "link", "set", "uplink", "up")
        ip("addr", "add", f"{topo.host_ip}/{prefix}", "dev", topo.uplink)
        ip("link", "set", topo.uplink, "up")
    except BaseException:
        destroy(topo)
        raise
    return topo


def destroy(topo: Topology) -> None:
    """Kill every process left in the namespaces, delete them and the uplink. Safe to call twice."""
    for ns in [*topo.device_ns, topo.broker_ns]:
        kill_namespace_processes(ns)
        ip("netns", "del", ns, check=False)
    ip("link", "del", topo.uplink, check=False)  # usually gone with its peer already
    # Namespace teardown is asynchronous: wait until the root namespace no longer shows the uplink.
    end = time.monotonic() + 5
    while time.monotonic() < end and ip("link", "show", topo.uplink, check=False).returncode == 0:
        time.sleep(0.05)
