"""What ``fedcmd simulate --visible ...`` attaches to a simulation's event stream."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud.config import ConfigError, RunConfig
from cloud.monitor.config import MonitorConfig
from cloud.monitor.events import EventBus

TENSORBOARD_ROOT = Path("runs/tensorboard")


@dataclass
class Watchers:
    url: str | None = None  # the dashboard's, when --visible 1
    tensorboard: Path | None = None
    keep: float = 0.0
    _monitor: Any = None
    _sinks: list[Any] = field(default_factory=list)

    def stop(self, linger: bool = True) -> None:
        if self._monitor is not None:
            if self.keep and linger:
                try:
                    time.sleep(self.keep)  # the finished run stays on screen (Ctrl-C ends it early)
                except KeyboardInterrupt:
                    pass
            self._monitor.stop()
            self._monitor = None
        for sink in self._sinks:
            sink.close()
        self._sinks = []


def watch_simulation(cfg: RunConfig, events: EventBus, run_name: str) -> Watchers:
    """Start what cfg.visible / cfg.tensorboard ask for; ConfigError (one line) for a bad host, port, token."""
    w = Watchers(keep=cfg.visible_keep)
    tensorboard = cfg.tensorboard
    if tensorboard is None and cfg.visible == "tensorboard":
        tensorboard = TENSORBOARD_ROOT / run_name
    if cfg.visible == "1":
        from pydantic import ValidationError

        from cloud.monitor.server import start_monitor
        from fedcmd_core.runspec import first_error

        try:
            mc = MonitorConfig(enabled=True, host=cfg.visible_host, port=cfg.visible_port, tensorboard=tensorboard)
        except ValidationError as e:
            raise ConfigError(f"--visible-host: {first_error(e)}") from None
        w._monitor = start_monitor(mc, events, title=f"{cfg.algo} on {cfg.dataset}", fleet="sim")
        w.url = w._monitor.url
    elif tensorboard is not None:
        from cloud.monitor.tensorboard import TensorBoardSink

        w._sinks.append(events.subscribe(TensorBoardSink(tensorboard)))
    w.tensorboard = tensorboard
    return w
