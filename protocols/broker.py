"""Private MQTT brokers on a free loopback port: for tests, ``fedcmd simulate --broker auto`` and demos.

``mosquitto`` runs as a subprocess with a config from :func:`mosquitto_config`, the one generator of
mosquitto settings in the tree (``cloud.deploy.security.broker_config`` builds the fleet broker's with it,
and ``deploy/mosquitto/mosquitto.conf`` is checked against it). Two settings matter (DESIGN.md §6):
``max_queued_messages 0`` (the default of 1000 silently drops QoS 1 bursts to a busy subscriber) and,
when we run as root, ``user root`` (mosquitto otherwise drops privileges to user ``mosquitto``, which
then cannot read files in a root-only work directory such as password or ACL files). The embedded
``amqtt`` broker (pure Python, MQTT 3.1.1, ~10x slower) is the fallback where mosquitto is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("fedcmd.broker")

BrokerKind = Literal["auto", "mosquitto", "amqtt"]
HOST = "127.0.0.1"
MAX_PACKET_SIZE = 1024 * 1024  # like EMQX's default: our 256 KiB chunks must get through it


class BrokerError(RuntimeError):
    """The broker could not be started (the text includes the end of its log)."""


def mosquitto_path() -> str | None:
    """The mosquitto executable, or None (it often lives in /usr/sbin, outside a user's PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Listener:
    """One mosquitto listener. ``bind``: the address (None: every interface, IPv4 and IPv6). ``tls``: the
    (cafile, certfile, keyfile) of a TLS listener; ``cert_identity``: TLS clients must present a certificate
    from cafile and its CN is their username. ``username_as_clientid``: the broker knows each client by its
    username (a device cannot knock another off with its client id). ``unlimited_connections``: say
    mosquitto's default (no cap) out loud, for the fleet-scale private broker."""

    port: int
    bind: str | None = HOST
    tls: tuple[Path, Path, Path] | None = None
    cert_identity: bool = False
    username_as_clientid: bool = False
    unlimited_connections: bool = False

    def lines(self) -> list[str]:
        out = [f"listener {self.port} {self.bind}" if self.bind else f"listener {self.port}"]
        if self.unlimited_connections:
            out.append("max_connections -1")
        if self.tls is not None:
            cafile, certfile, keyfile = self.tls
            out += [f"cafile {cafile}", f"certfile {certfile}", f"keyfile {keyfile}",
                    f"require_certificate {'true' if self.cert_identity else 'false'}"]
            if self.cert_identity:
                out.append("use_identity_as_username true")
        if self.username_as_clientid:
            out.append("use_username_as_clientid true")
        return out


def mosquitto_config(
    listeners: Sequence[Listener],
    *,
    password_file: Path | None = None,
    acl_file: Path | None = None,
    anonymous: bool = False,
    fleet_scale: bool = False,
    run_as_root: bool | None = None,
    header: str = "",
    extra: Sequence[str] = (),
) -> str:
    """A mosquitto 2.0 config: the global settings, then each listener with its own.

    ``anonymous``: anyone may connect (the private test/sim broker); else logins go through
    ``password_file`` and ``acl_file``. ``fleet_scale``: a loopback broker for thousands of simulated
    agents (issue 16): no Nagle delay on small packets, no cap on in-flight QoS 1 messages.
    ``run_as_root``: add ``user root`` (None: when this process is root). ``extra`` lines go last."""
    lines = [header] if header else []
    lines += ["per_listener_settings false", f"allow_anonymous {'true' if anonymous else 'false'}"]
    if password_file is not None:
        lines.append(f"password_file {password_file}")
    if acl_file is not None:
        lines.append(f"acl_file {acl_file}")
    if fleet_scale:
        lines += ["set_tcp_nodelay true", "max_inflight_messages 0"]
    lines += [
        "max_queued_messages 0",  # unlimited: the default 1000 drops QoS 1 bursts silently
        f"max_packet_size {MAX_PACKET_SIZE}",
        # The tests' and the simulation's brokers start empty; production's (deploy/mosquitto) persists.
        "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
    ]
    if run_as_root if run_as_root is not None else (hasattr(os, "geteuid") and os.geteuid() == 0):
        lines.append("user root")  # else mosquitto becomes user 'mosquitto' and cannot read our files
    for listener in listeners:
        lines += ["", *listener.lines()]
    lines += list(extra)
    return "\n".join(lines) + "\n"


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Broker:
    """A running broker: ``url``, ``host``, ``port``, ``log_path`` (mosquitto), ``stop()``, ``restart()``."""

    kind: str = ""

    def __init__(self, port: int) -> None:
        self.host = HOST
        self.port = port
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        """Stop and start again on the same port (sessions and retained messages are gone)."""
        self.stop()
        self.start()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} running={self.running}>"


def _raise_fd_limit() -> None:
    """In the broker's child process: open files up to the hard limit (a connection is a descriptor)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


class MosquittoBroker(Broker):
    kind = "mosquitto"

    def __init__(
        self,
        port: int,
        workdir: Path,
        extra_config: str = "",
        executable: str | None = None,
        *,
        host: str = HOST,
        launcher: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        """``host``: the address to listen on and to check readiness at. ``launcher`` rewrites the command
        line before it starts (e.g. into ``ip netns exec NS ...``: the tests' namespace fleet)."""
        super().__init__(port)
        self.host = host
        self._launcher = launcher
        exe = executable or mosquitto_path()
        if exe is None:
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
        self.executable = exe
        self.workdir = workdir
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        # Fleet scale (issue 16): each connection is one file descriptor, so start() also lifts the broker's
        # soft RLIMIT_NOFILE to its hard limit (10,000 agents need 10,000+).
        config = mosquitto_config(
            [Listener(port, host, unlimited_connections=True)], anonymous=True, fleet_scale=True,
            extra=[extra_config.strip()] if extra_config.strip() else (),
        )
        self.config_path.write_text(config)
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 15.0) -> None:
        if self.running:
            return
        assert self.log_path is not None
        argv = [self.executable, "-c", str(self.config_path)]
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                self._launcher(argv) if self._launcher else argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_raise_fd_limit,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"mosquitto exited with {self._proc.returncode}: {self.log_tail()}")
            if _listening(self.host, self.port):
                log.info("mosquitto listening on %s (config %s)", self.url, self.config_path)
                return
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on {self.url} within {timeout} s: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:] if self.log_path else ""
        except OSError:
            return ""

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


class AmqttBroker(Broker):
    """amqtt's Broker, created inside its own asyncio loop on a daemon thread (it needs a running loop)."""

    kind = "amqtt"

    @property
    def url(self) -> str:
        # amqtt speaks MQTT 3.1.1 only and hangs on an MQTT 5 CONNECT with properties: say so up front.
        return f"mqtt://{self.host}:{self.port}?protocol=3.1.1"

    def __init__(self, port: int, config: dict[str, Any] | None = None) -> None:
        super().__init__(port)
        self._config = config
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self.start()

    def _broker_config(self) -> dict[str, Any]:
        if self._config is not None:
            return self._config
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # only anonymous auth: the default $SYS and packet-logging plugins cost time and log noise
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 15.0) -> None:
        if self.running:
            return
        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            from amqtt.broker import Broker as _AmqttBroker

            self._loop = asyncio.get_running_loop()
            self._stop_event = asyncio.Event()
            try:
                broker = _AmqttBroker(self._broker_config())
                await broker.start()
            except BaseException as e:
                failure.append(e)
                ready.set()
                return
            ready.set()
            await self._stop_event.wait()
            with contextlib.suppress(Exception):
                await broker.shutdown()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), name=f"amqtt-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise BrokerError(f"amqtt did not start on {self.url} within {timeout} s")
        if failure:
            self._thread.join(5)
            raise BrokerError(f"amqtt failed to start on {self.url}: {failure[0]!r}") from failure[0]
        log.info("amqtt listening on %s", self.url)

    def stop(self) -> None:
        thread, loop, event = self._thread, self._loop, self._stop_event
        self._thread = None
        if thread is None or loop is None or event is None or not thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):  # the loop may have ended already
            loop.call_soon_threadsafe(event.set)
        thread.join(15)


def start_broker(
    kind: BrokerKind = "auto",
    port: int | None = None,
    extra_config: str = "",
    workdir: Path | None = None,
) -> Broker:
    """Start a broker on ``127.0.0.1:port`` (a free port when None) and return once it accepts connections.

    ``auto``: mosquitto if installed, else the embedded amqtt. ``extra_config`` is appended to the
    generated mosquitto config (ignored by amqtt); ``workdir`` holds the config and log (a new temporary
    directory when None). Stop it with ``broker.stop()`` (or use it as a context manager).
    """
    if kind not in ("auto", "mosquitto", "amqtt"):
        raise ValueError(f"unknown broker kind {kind!r}: auto, mosquitto or amqtt")
    if kind == "auto":
        kind = "mosquitto" if mosquitto_path() else "amqtt"
    if kind == "amqtt" and extra_config:
        log.warning("extra_config is mosquitto syntax; ignored for amqtt")
    if kind == "mosquitto":
        workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="fedcmd-mosquitto-"))
        workdir.mkdir(parents=True, exist_ok=True)
    # A free port can be taken by someone else before the broker binds it: try a few when we chose it.
    for attempt in range(3 if port is None else 1):
        try:
            chosen = port or free_port()
            if kind == "amqtt":
                return AmqttBroker(chosen)
            assert workdir is not None
            return MosquittoBroker(chosen, workdir, extra_config)
        except BrokerError:
            if attempt == (2 if port is None else 0):
                raise
            log.info("broker did not start on a port that was free a moment ago; trying another")
    raise AssertionError("unreachable")
