"""Serving the dashboard on a background thread (uvicorn) beside the round loop, and the sinks it feeds."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from cloud.config import ConfigError
from cloud.monitor.config import MonitorConfig
from cloud.monitor.events import EventBus
from cloud.monitor.prometheus import PrometheusSink
from cloud.monitor.state import DashboardState

log = logging.getLogger("fedcmd.monitor")
START_TIMEOUT = 10.0


def _listen(host: str, port: int) -> socket.socket:
    """Bind first, so a taken port is one line (exit 2) before any work, not a log line from a thread."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a name such as localhost
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"monitor: port {port} on {host} is in use; choose another (--visible-port, "
                              "[monitor] port; 0 = any free port)") from None
        raise ConfigError(f"monitor: cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(64)
    sock.setblocking(False)
    return sock


@dataclass
class Monitor:
    state: DashboardState
    prometheus: PrometheusSink | None
    url: str
    host: str
    port: int
    sinks: list[Any] = field(default_factory=list)
    _server: Any = None
    _thread: threading.Thread | None = None
    _events: EventBus | None = None
    _closing: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        """Stop serving and unsubscribe; safe to call twice."""
        if self._events is not None:
            for sink in self.sinks:
                self._events.unsubscribe(sink)
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
        self.sinks = []
        self._closing.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def serve_state(state: DashboardState, cfg: MonitorConfig, prometheus: PrometheusSink | None = None) -> Monitor:
    """Serve ``state`` at cfg.host:cfg.port on a daemon thread; returns once it accepts connections."""
    import uvicorn

    from cloud.monitor.app import build_app

    sock = _listen(cfg.host, cfg.port)
    port = sock.getsockname()[1]
    closing = threading.Event()
    app = build_app(state, prometheus, cfg.token, closing.is_set)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                            timeout_graceful_shutdown=1, timeout_keep_alive=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fedcmd-monitor", daemon=True)
    thread.start()
    ready = threading.Event()

    def wait() -> None:
        import time

        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end and thread.is_alive() and not server.started:
            time.sleep(0.02)
        ready.set()

    wait()
    if not server.started:
        server.should_exit = True
        raise ConfigError(f"monitor: the web server did not start on {cfg.host}:{port}")
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    url = f"http://{shown}:{port}/" + (f"?token={quote(cfg.token)}" if cfg.token else "")
    return Monitor(state, prometheus, url, cfg.host, port, _server=server, _thread=thread, _closing=closing)


def start_monitor(cfg: MonitorConfig, events: EventBus, title: str, fleet: str = "sim",
                  fleet_view: bool = True) -> Monitor:
    """Subscribe the dashboard, Prometheus (and TensorBoard when configured) to ``events`` and serve them."""
    state = DashboardState(title, fleet_view=fleet_view)
    prometheus = PrometheusSink(fleet)
    sinks: list[Any] = [state, prometheus]
    if cfg.tensorboard is not None:
        from cloud.monitor.tensorboard import TensorBoardSink

        sinks.append(TensorBoardSink(cfg.tensorboard))
    monitor = serve_state(state, cfg, prometheus)
    for sink in sinks:
        events.subscribe(sink)
    monitor.sinks, monitor._events = sinks, events
    return monitor
