"""pytest plugin of the hardware-in-the-loop suite (registered by tests/conftest.py; see tests/hil/README.md).

``pytest --fleet fleet.toml -m hil``: the suite runs against the inventory's devices over the real broker.
Without ``--fleet``: against namespace devices this plugin makes (root only; skipped with the reason
elsewhere). Fixtures: ``fleet`` (a :class:`hil.fleet.FleetUnderTest`, one per session).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from hil.fleet import FleetUnderTest

_REPORT: list[list[str]] = []  # what the terminal summary says about the fleet under test


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hil", "hardware-in-the-loop suite (tests/hil, marker hil)")
    group.addoption("--fleet", metavar="FLEET.toml", type=Path, default=None,
                    help="run the hil suite against this inventory's devices (default: namespace devices made "
                         "by the plugin, as root)")
    group.addoption("--fleet-cloud-config", metavar="CLOUD.toml", type=Path, default=None,
                    help="with --fleet: the fleet's `fedcmd cloud serve` config (broker, credentials, [run]); "
                         "tests that run a coordinator skip without it")
    group.addoption("--fleet-broker-restart", metavar="CMD", default=None,
                    help="with --fleet: shell command that restarts the fleet's broker (else that test skips)")
    group.addoption("--fleet-edge-cmd", metavar="CMD", default="fedcmd-edge",
                    help="with --fleet: how `fedcmd-edge` is invoked over ssh on the devices [fedcmd-edge]")
    group.addoption("--hil-arm", action="store_true", default=os.environ.get("FEDCMD_HIL_ARM") == "1",
                    help="namespace fleet with an emulated aarch64 Raspberry Pi (qemu; tests/hil/arm_fleet.py) "
                         "and the aarch64 tests (test_arm.py); `make hil-arm`. Also FEDCMD_HIL_ARM=1")


def arm_enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("--hil-arm")) and config.getoption("--fleet") is None


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """test_arm*.py are the aarch64 part: collected only with --hil-arm (make hil-arm), so make test's
    time does not depend on an emulated build, and nothing of it shows up as skipped there."""
    if collection_path.name.startswith("test_arm") and collection_path.parent.name == "hil":
        return None if arm_enabled(config) else True
    return None


def pytest_configure(config: pytest.Config) -> None:
    inventory = config.getoption("--fleet")
    if inventory is None:
        return
    from cloud.deploy.inventory import InventoryError, load_inventory

    try:  # a broken inventory is a usage error at start, not N failing tests
        load_inventory(inventory)
    except InventoryError as e:
        raise pytest.UsageError(f"--fleet {inventory}:\n" + "\n".join(e.lines)) from None
    cloud = config.getoption("--fleet-cloud-config")
    if cloud is not None:
        from cloud.service.serve import load_serve_config

        try:
            served = load_serve_config(cloud).fleet
        except ValueError as e:
            raise pytest.UsageError(f"--fleet-cloud-config: {e}") from None
        if served != load_inventory(inventory).fleet.name:
            raise pytest.UsageError(f"--fleet-cloud-config {cloud} serves fleet {served!r}, not the inventory's "
                                    f"{load_inventory(inventory).fleet.name!r}")


@pytest.fixture(scope="session")
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetUnderTest]:
    """The fleet under test, shared by the whole suite (agents import torch: seconds each)."""
    opt = request.config.getoption
    if opt("--fleet") is not None:
        from hil.inventory_fleet import InventoryFleet

        made: FleetUnderTest = InventoryFleet.start(
            opt("--fleet"), opt("--fleet-cloud-config"), opt("--fleet-broker-restart"), opt("--fleet-edge-cmd"))
    else:
        from brokers import MOSQUITTO, SKIP_REASON

        from hil import netns

        # every simulated device talks to a real mosquitto: without it the suite skips, it does not error
        reason = netns.why_unavailable() or (SKIP_REASON if MOSQUITTO is None else None)
        if reason:
            pytest.skip(reason)
        # the shared partition of tests/conftest.py's shared_partition (a session fixture cannot use that one)
        partition = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist5k-d01-s42.npz"
        if not partition.is_file():
            pytest.skip(f"the shared mnist5k partition is not present at {partition}")
        if arm_enabled(request.config):
            from hil import arm_rootfs
            from hil.arm_fleet import MixedFleet

            why = arm_rootfs.why_unavailable()
            if why:
                pytest.skip(f"no emulated aarch64 device: {why}")
            made = MixedFleet.start_mixed(tmp_path_factory.mktemp("hil-fleet"), partition)
        else:
            from hil.netns_fleet import NetnsFleet

            made = NetnsFleet.start(tmp_path_factory.mktemp("hil-fleet"), partition)
    atexit.register(made.close)  # if the session ends without teardown; close() is idempotent
    _REPORT[:] = [made.report]  # the fleet's own list: tests may add lines (test_arm.py's measurements)
    try:
        yield made
    finally:
        made.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _REPORT:
        terminalreporter.section("hil: fleet under test and the limits enforced on it")
        for lines in _REPORT:
            for line in lines:
                terminalreporter.write_line(line)
