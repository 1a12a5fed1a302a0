from __future__ import annotations

from pathlib import Path

import pytest
import torch
from brokers import amqtt_broker, mosquitto_broker, mosquitto_factory  # noqa: F401  (fixtures for every test)

pytest_plugins = ["hil.plugin"]  # the hardware-in-the-loop suite's options and fixtures (tests/hil)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(1)


@pytest.fixture
def shared_partition() -> Path:
    path = SHARED_DATA / "mnist5k-d01-s42.npz"
    if not path.is_file():
        pytest.skip(f"shared partitions not present at {SHARED_DATA}")
    return path
