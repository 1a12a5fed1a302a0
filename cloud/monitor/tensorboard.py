"""Per-round scalars for TensorBoard (``--visible tensorboard``, ``--tensorboard DIR``, ``[monitor]
tensorboard``), fed by the event stream. Needs ``tensorboardX`` (``pip install 'fedcmd[tensorboard]'``), so
the base install stays small; read the folder with ``tensorboard --logdir DIR``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cloud.config import ConfigError
from cloud.monitor import events as ev

SCALARS = ("test_before_acc", "test_after_acc", "test_before_loss", "test_after_loss", "all_test_before_acc")


class TensorBoardSink:
    def __init__(self, logdir: Path) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError("--visible tensorboard needs tensorboardX: pip install 'fedcmd[tensorboard]'") from None
        try:
            logdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"tensorboard folder {logdir}: {e.strerror or e}") from None
        self.logdir = logdir
        self.writer = SummaryWriter(logdir=str(logdir), flush_secs=5)

    def __call__(self, e: Any) -> None:
        if isinstance(e, ev.RoundClosed):
            r = e.record
            step = r.round + 1
            for key in SCALARS:
                if key in r.metrics:
                    self.writer.add_scalar(f"accuracy/{key}" if key.endswith("acc") else f"loss/{key}",
                                           float(r.metrics[key]), step)
            self.writer.add_scalar("bytes/down", float(r.bytes_down), step)
            self.writer.add_scalar("bytes/up", float(r.bytes_up), step)
            self.writer.add_scalar("time/round_seconds", float(r.seconds), step)
            self.writer.add_scalar("round/answered", float(len(r.answered)), step)
            for reason, n in e.rejected.items():
                self.writer.add_scalar(f"rejected/{reason}", float(n), step)
        elif isinstance(e, ev.RunFinished):
            for key, value in e.final.items():
                if key.endswith("_acc"):
                    self.writer.add_scalar(f"final/{key}", float(value), 0)
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()
