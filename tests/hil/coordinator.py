"""A coordinator for one test: ``fedcmd cloud serve --config`` with a generated cloud.toml, as in
tests/test_fleet_faults.py, and what it leaves behind (metrics.csv rows, its log)."""

from __future__ import annotations

import copy
import csv
import json
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")

# The run the namespace fleet trains: LeNet-5 on the shared mnist5k partition (50 clients), one local
# epoch so that a round takes a fraction of a second; fedcmd with a one-round selection phase, so that
# every run also exercises the personal phase.
NETNS_RUN: dict[str, Any] = {
    "algo": "fedcmd", "input_shape": [1, 28, 28], "num_classes": 10, "num_clients": 50,
    "local_epoch": 1, "seed": 4, "hp": {"selection_rounds": 1},
}


def to_toml(table: dict[str, Any], prefix: str = "") -> str:
    """TOML for a config of scalars, lists and nested tables (JSON scalars are valid TOML values)."""
    lines = [f"[{prefix}]"] if prefix else []
    subtables = []
    for key, value in table.items():
        if not _BARE_KEY.match(key):
            raise ValueError(f"config key {key!r} is not a bare TOML key")
        if isinstance(value, dict):
            subtables.append((key, value))
        elif value is not None:
            lines.append(f"{key} = {json.dumps(str(value) if isinstance(value, Path) else value)}")
    text = "\n".join(lines) + "\n"
    for key, value in subtables:
        text += to_toml(value, f"{prefix}.{key}" if prefix else key)
    return text


def serve_config(base: dict[str, Any], workdir: Path, rounds: int, **settings: Any) -> dict[str, Any]:
    """``base`` (broker, credentials, [run]) with this test's rounds, folders and round settings."""
    cfg = copy.deepcopy(base)
    cfg.update({"checkpoint": workdir / "ckpt.safetensors", "out": workdir / "out", **settings})
    cfg["run"] = {**cfg.get("run", {}), "global_epoch": rounds}
    return cfg


class CoordinatorRun:
    """A running ``fedcmd cloud serve``; ``prefix`` places it (``ip netns exec <broker ns>`` or nothing)."""

    def __init__(self, config: dict[str, Any], workdir: Path, prefix: Sequence[str] = ()) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.out = Path(config["out"])
        self.config_path = workdir / "cloud.toml"
        self.config_path.write_text(to_toml(config))
        self.log_path = workdir / "serve.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*prefix, str(BIN / "fedcmd"), "cloud", "serve", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def wait(self, timeout: float) -> list[dict[str, str]]:
        """Wait for the run to finish cleanly; its metrics.csv rows."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"the coordinator did not finish within {timeout:.0f} s:\n{self.log_tail()}") from None
        assert rc == 0, f"the coordinator exited with {rc}:\n{self.log_tail()}"
        return self.rows()

    def rows(self) -> list[dict[str, str]]:
        with (self.out / "metrics.csv").open() as f:
            return list(csv.DictReader(f))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def answered(row: dict[str, str]) -> set[int]:
    return {int(c) for c in row["answered"].split()}


def sampled(row: dict[str, str]) -> set[int]:
    return {int(c) for c in row["sampled"].split()}


def wait_file(check: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)
