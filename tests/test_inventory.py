"""fleet.toml inventories: the shipped example loads, and every mistake reaches the operator as one clear
line of `fedcmd deploy systemd` (exit 2, no traceback, nothing written)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cloud.cli.main import app
from cloud.deploy.inventory import load_inventory
from edge_agent.profiles import PROFILES

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "fleet.toml"

GOOD = """\
[fleet]
name = "lab"
broker = "mqtts://mqtt.lab.example:8883"

[[device]]
id = 0
host = "pi-0"
profile = "rpi4"

[[device]]
id = 1
host = "pi-1"
profile = "rpi5"
"""


def test_example_inventory_loads() -> None:
    inv = load_inventory(EXAMPLE)
    assert inv.fleet.name == "lab" and inv.fleet.broker.startswith("mqtts://") and inv.fleet.tls
    assert [d.id for d in inv.device] == [0, 1, 2, 3]
    assert [d.profile for d in inv.device] == ["rpi4", "rpi4", "rpi5", "jetson-orin"]
    assert all(d.profile in PROFILES and d.host for d in inv.device)
    pi, jetson = inv.device[0], inv.device[3]
    assert inv.data_of(pi) == "/var/lib/fedcmd/partition.npz" and inv.data_of(jetson) == "/data/fedcmd/partition.npz"
    assert inv.dataset_of(jetson) == "mnist5k" and inv.root_of(jetson) is None


def deploy_systemd(inventory: Path, out: Path) -> Any:
    return CliRunner().invoke(app, ["deploy", "systemd", "--inventory", str(inventory), "--out", str(out)])


def error_lines(result: Any) -> list[str]:
    """Exit 2, only `error:` lines on stderr, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (ValueError, OSError))
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr
    return lines


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("id = 1", "id = 0", "[[device]] #2: duplicate id 0 (already device #1)"),
        ('"rpi5"', '"rpi9"', "[[device]] id 1: unknown profile 'rpi9' (known: rpi4, rpi5,"),
        ('profile = "rpi4"', 'profile = "rpi4"\ncolour = "red"', "[[device]] id 0: colour: unknown key"),
        ("[fleet]\n", '[fleet]\nbrokr = "x"\n', "fleet.brokr: unknown key"),
        ("id = 1\n", "id = 1\nid = 2\n", "is not valid TOML"),
        ('name = "lab"', "name = lab", "is not valid TOML"),
        ('"mqtts://mqtt.lab.example:8883"', '"mqtt://mqtt.lab.example:1883"',
         "tls = true but broker is 'mqtt://mqtt.lab.example:1883': use a mqtts:// broker URL or set tls = false"),
        ('profile = "rpi4"', 'profile = "rpi4"\nroot = "datasets"',
         "[[device]] id 0: root 'datasets' must be an absolute path"),
    ],
    ids=["duplicate-id", "unknown-profile", "unknown-device-key", "unknown-fleet-key", "duplicate-key", "bare-word",
         "tls-scheme-mismatch", "relative-root"],
)
def test_one_clear_line_per_mistake(tmp_path: Path, old: str, new: str, expected: str) -> None:
    inventory = tmp_path / "bad.toml"
    assert old in GOOD
    inventory.write_text(GOOD.replace(old, new, 1))
    lines = error_lines(deploy_systemd(inventory, tmp_path / "out"))
    assert len(lines) == 1, lines
    assert expected in lines[0] and str(inventory) in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_inventory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "fleet.toml"
    assert error_lines(deploy_systemd(missing, tmp_path / "out")) == [f"error: inventory {missing} does not exist"]
    assert not (tmp_path / "out").exists()


def test_every_problem_at_once(tmp_path: Path) -> None:
    inventory = tmp_path / "bad.toml"
    inventory.write_text(GOOD.replace("id = 1", "id = 0").replace('"rpi5"', '"tpu"').replace('"pi-1"', '"pi-0"')
                         .replace('broker = "mqtts://mqtt.lab.example:8883"', 'broker = "http://x"'))
    lines = error_lines(deploy_systemd(inventory, tmp_path / "out"))
    assert len(lines) == 4, lines
    for what in ("[fleet] broker", "duplicate id 0", "host 'pi-0' is already device #1", "unknown profile 'tpu'"):
        assert sum(what in line for line in lines) == 1, (what, lines)


def test_good_inventory_renders(tmp_path: Path) -> None:
    inventory = tmp_path / "fleet.toml"
    inventory.write_text(GOOD)
    result = deploy_systemd(inventory, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.service")) == [
        "fedcmd-coordinator.service", "pi-0/fedcmd-agent.service", "pi-1/fedcmd-agent.service"]
    assert "--client-id 1 --profile rpi5" in (tmp_path / "out" / "pi-1" / "fedcmd-agent.service").read_text()
