"""A fleet inventory (``fleet.toml``): which devices exist, their ids, profiles and data paths.

One file describes a deployed fleet for three readers: ``fedcmd deploy systemd --inventory`` renders
each device's agent unit from it, the hardware-in-the-loop test plugin (``pytest --fleet fleet.toml``)
reaches the devices it lists, and an operator reads it. Paths under ``[fleet]`` and ``[[device]]`` are
paths *on the devices*, not on the machine that reads the file::

    [fleet]
    name = "lab"                                  # topic prefix fedcmd/<name>/
    broker = "mqtts://mqtt.lab.example:8883"      # as the devices dial it
    dataset = "mnist5k"                           # default for every device
    data = "/var/lib/fedcmd/partition.npz"        # default partition file on every device

    [[device]]
    id = 0
    host = "pi-lab-00"                            # how an operator (or ssh) reaches it
    profile = "rpi4"

Every problem is reported at once, one line each, naming the device (``InventoryError.lines``).
"""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class InventoryError(ValueError):
    """What is wrong with an inventory, one line per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


class FleetSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="fleet name: the topic prefix fedcmd/<name>/")
    broker: str = Field(description="broker URL as the devices dial it (mqtt:// or mqtts://)")
    dataset: str = Field("mnist5k", description="dataset every device's partition indexes")
    data: str = Field("/var/lib/fedcmd/partition.npz", description="partition .npz on each device")
    root: str | None = Field(None, description="folder of torchvision-format datasets on each device")
    credentials: str = Field(
        "/etc/fedcmd", description="folder on each device holding ca.crt, password, client.crt/client.key"
    )
    state_dir: str = Field("/var/lib/fedcmd/state", description="the agent's state folder on each device")
    tls: bool = Field(True, description="dial the broker with TLS (the CA at <credentials>/ca.crt)")
    client_certs: bool = Field(False, description="also present <credentials>/client.crt and client.key")


class Device(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: int = Field(ge=0, description="client id in the fleet = MQTT username")
    profile: str = Field(description="device profile: rpi4, rpi5, jetson-nano, jetson-orin, x86")
    host: str | None = Field(None, description="host name or address an operator reaches it by")
    ssh: str | None = Field(None, description="ssh destination (user@host) for tests that run commands on it")
    dataset: str | None = None
    data: str | None = None
    root: str | None = None


class Inventory(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fleet: FleetSection
    device: list[Device] = Field(min_length=1)

    def data_of(self, device: Device) -> str:
        return device.data or self.fleet.data

    def dataset_of(self, device: Device) -> str:
        return device.dataset or self.fleet.dataset

    def root_of(self, device: Device) -> str | None:
        return device.root or self.fleet.root


def _where(loc: tuple[Any, ...], raw: dict[str, Any]) -> str:
    if len(loc) >= 2 and loc[0] == "device" and isinstance(loc[1], int):
        devices = raw.get("device") or []
        dev = devices[loc[1]] if loc[1] < len(devices) and isinstance(devices[loc[1]], dict) else {}
        name = f"id {dev['id']}" if "id" in dev else f"#{loc[1] + 1}"
        return f"[[device]] {name}" + (f": {'.'.join(map(str, loc[2:]))}" if len(loc) > 2 else "")
    return ".".join(str(p) for p in loc) or "inventory"


def _semantic_problems(inv: Inventory) -> list[str]:
    from edge_agent.profiles import PROFILES
    from protocols.mqtt import parse_url
    from protocols.topics import check_fleet

    problems: list[str] = []
    try:
        check_fleet(inv.fleet.name)
    except ValueError:
        problems.append(f"[fleet] name {inv.fleet.name!r}: use 1-64 letters, digits, '_', '-', '.'")
    try:
        address = parse_url(inv.fleet.broker)
    except ValueError as e:
        problems.append(f"[fleet] broker: {e}")
    else:
        if address.tls != inv.fleet.tls:  # the agent would speak TLS to a plain port, or plain MQTT to TLS
            scheme = "mqtts" if inv.fleet.tls else "mqtt"
            problems.append(f"[fleet] tls = {str(inv.fleet.tls).lower()} but broker is {inv.fleet.broker!r}: "
                            f"use a {scheme}:// broker URL or set tls = {str(not inv.fleet.tls).lower()}")
    for label, value in (("data", inv.fleet.data), ("credentials", inv.fleet.credentials),
                         ("state_dir", inv.fleet.state_dir), ("root", inv.fleet.root)):
        if value is not None and not PurePosixPath(value).is_absolute():
            problems.append(f"[fleet] {label} {value!r} must be an absolute path on the devices")
    seen_ids: dict[int, int] = {}
    seen_hosts: dict[str, int] = {}
    for n, dev in enumerate(inv.device, start=1):
        if dev.id in seen_ids:
            problems.append(f"[[device]] #{n}: duplicate id {dev.id} (already device #{seen_ids[dev.id]})")
        seen_ids.setdefault(dev.id, n)
        if dev.host is not None:
            if dev.host in seen_hosts:
                problems.append(f"[[device]] id {dev.id}: host {dev.host!r} is already device #{seen_hosts[dev.host]}")
            seen_hosts.setdefault(dev.host, n)
        if dev.profile.lower() not in PROFILES:
            problems.append(
                f"[[device]] id {dev.id}: unknown profile {dev.profile!r} (known: {', '.join(PROFILES)})"
            )
        for label, value in (("data", dev.data), ("root", dev.root)):
            if value is not None and not PurePosixPath(value).is_absolute():
                problems.append(f"[[device]] id {dev.id}: {label} {value!r} must be an absolute path on the device")
    return problems


def parse_inventory(raw: dict[str, Any]) -> Inventory:
    """Validate an inventory already read from TOML."""
    try:
        inv = Inventory.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{_where(tuple(err['loc']), raw)}: {what}")
        raise InventoryError(lines) from None
    problems = _semantic_problems(inv)
    if problems:
        raise InventoryError(problems)
    return inv


def load_inventory(path: Path) -> Inventory:
    """Read and validate ``fleet.toml``; ``InventoryError`` lists every problem, one line each."""
    if not path.is_file():
        raise InventoryError([f"inventory {path} does not exist"])
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InventoryError([f"inventory {path} is not valid TOML: {e}"]) from None
    try:
        return parse_inventory(raw)
    except InventoryError as e:
        raise InventoryError([f"{path}: {line}" for line in e.lines]) from None
