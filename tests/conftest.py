from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from brokers import amqtt_broker, mosquitto_broker, mosquitto_factory  # noqa: F401  (fixtures for every test)

pytest_plugins = [
    "hil.plugin",  # the hardware-in-the-loop suite's options and fixtures (tests/hil)
    "skip_report",  # skipped tests by reason; FEDCMD_ALLOWED_SKIPS turns other skips into a failure
]

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# CI (.ci/run) sets it (and FEDCMD_ALLOWED_SKIPS, tests/skip_report.py): coverage must not vanish behind skips.
REQUIRE_MOSQUITTO = "FEDCMD_REQUIRE_MOSQUITTO"  # "1": no mosquitto is an error, not ~40 skipped tests

torch.set_num_threads(1)


@pytest.fixture
def shared_partition() -> Path:
    path = SHARED_DATA / "mnist5k-d01-s42.npz"
    if not path.is_file():
        pytest.skip(f"shared partitions not present at {SHARED_DATA}")
    return path


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get(REQUIRE_MOSQUITTO) == "1":
        from brokers import MOSQUITTO, MOSQUITTO_PUB, MOSQUITTO_SUB

        if MOSQUITTO is None or MOSQUITTO_PUB is None or MOSQUITTO_SUB is None:
            raise pytest.UsageError(
                f"{REQUIRE_MOSQUITTO}=1 but mosquitto, mosquitto_pub or mosquitto_sub is not installed "
                "(apt-get install -y mosquitto mosquitto-clients): the MQTT tests would all skip"
            )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # make test runs the suite on two pytest-xdist workers (--dist loadgroup): the hardware-in-the-loop tests
    # share one namespace fleet with fixed namespace names, so all of them go to the same worker
    group = pytest.mark.xdist_group("hil")
    for item in items:
        if item.path.parent.name == "hil":
            item.add_marker(group)
