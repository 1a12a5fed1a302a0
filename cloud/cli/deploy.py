"""``fedcmd deploy certs|users|acl|systemd``: broker security files and the fleet's systemd units.

Thin command-line face of :mod:`cloud.deploy.security` and :mod:`cloud.deploy.systemd_units` (imported per command,
so that a machine without the ``cryptography`` package still has every other ``fedcmd`` command).
See deploy/README.md and deploy/mosquitto/README.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

from cloud.cli.apps import new_app
from cloud.cli.errors import fail, print_error

deploy_app = new_app("Deployment: TLS certificates, the mosquitto password file and ACL, systemd units for a fleet.")
# Resolved at print time, so test runners that swap sys.stdout/sys.stderr see the output.
_out = Console(highlight=False, soft_wrap=True)

_DEVICES = "Client ids: 0,1,2 or ranges such as 0-99,200 (MQTT username = the id)."
_COUNT = "Devices 0..N-1 (instead of --devices)."
_FORCE = "Overwrite existing output files (never the CA key)."


def _fail(message: str) -> NoReturn:
    fail(" ".join(message.split()))  # one line, whatever the wrapped exception text looked like


def _say(message: str) -> None:
    _out.print(escape(message))


def _rel(path: Path) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


@deploy_app.command()
def certs(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (created 0700: it holds the CA key)."),
    devices: Optional[str] = typer.Option(None, "--devices", help=_DEVICES),
    count: Optional[int] = typer.Option(None, "--count", "-n", help=_COUNT),
    fleet: str = typer.Option("default", "--fleet", help="Fleet name, recorded in the certificates (OU)."),
    broker_host: list[str] = typer.Option(
        ["localhost"], "--broker-host", help="Broker DNS name(s) for the server certificate's SAN; repeat or a,b."
    ),
    broker_ip: list[str] = typer.Option(
        ["127.0.0.1"], "--broker-ip", help="Broker IP address(es) for the SAN; repeat or a,b."
    ),
    days: int = typer.Option(825, "--days", help="Validity of the broker, coordinator and device certificates."),
    ca_days: int = typer.Option(3650, "--ca-days", help="Validity of a new CA."),
    key_type: str = typer.Option("ec", "--key-type", help="ec (P-256, default) or rsa (2048, for old TLS stacks)."),
    devices_only: bool = typer.Option(
        False, "--devices-only", help="Issue only device certificates with the existing CA (adding devices)."
    ),
    force: bool = typer.Option(False, "--force", help=_FORCE),
) -> None:
    """TLS: a CA, the broker's server certificate, the coordinator's and one per device (PEM).

    The CA in OUT is reused when present (its key is never replaced). Device certificates have
    CN = the device's MQTT username (its client id). Private keys are 0600."""
    from cloud.deploy.security import SecurityError, parse_device_ids, write_certs

    try:
        ids = parse_device_ids(devices, count)
        result = write_certs(
            out, ids, fleet=fleet, broker_hosts=broker_host, broker_ips=broker_ip, days=days, ca_days=ca_days,
            key_type=key_type, devices_only=devices_only, force=force,
        )
    except SecurityError as exc:
        _fail(str(exc))
    ca = "reused the existing CA" if result.reused_ca else "new CA"
    _say(f"{len(result.written)} files in {_rel(out)} ({ca}; {len(ids)} devices); keys are 0600.")
    _say("Broker: ca.crt, broker.crt, broker.key (make broker.key readable by the broker user, e.g. "
         "install -o mosquitto -m 0600). Device N: ca.crt, N.crt, N.key. Keep ca.key off the broker.")


@deploy_app.command()
def users(
    out: Path = typer.Option(..., "--out", "-o", help="mosquitto password file to write."),
    devices: Optional[str] = typer.Option(None, "--devices", help=_DEVICES),
    count: Optional[int] = typer.Option(None, "--count", "-n", help=_COUNT),
    password_dir: Optional[Path] = typer.Option(
        None, "--password-dir", help="Where <username>.password files go [default: credentials/ beside OUT]."
    ),
    add: bool = typer.Option(
        False, "--add", help="Keep the users of an existing OUT and add these devices (no one else's password changes)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files; with --add: new passwords for "
                                                      "listed devices already in OUT."),
) -> None:
    """Passwords: the mosquitto password file and one 0600 <username>.password file per user.

    Random passwords for the coordinator, the observer and each device; the file has mosquitto 2.0's
    PBKDF2-SHA512 format, as mosquitto_passwd writes it."""
    from cloud.deploy.security import SecurityError, parse_device_ids, write_users

    try:
        result = write_users(out, parse_device_ids(devices, count), password_dir=password_dir, add=add, force=force)
    except SecurityError as exc:
        _fail(str(exc))
    kept = f", kept {len(result.kept)} existing" if result.kept else ""
    folder = _rel(result.credential_files[0].parent) if result.credential_files else "-"
    n = len(result.added)
    _say(f"{_rel(out)}: {n} user{'s' * (n != 1)} written{kept}; passwords in {folder}/<username>.password (0600).")
    _say("Make the password file readable by the broker user (e.g. install -o mosquitto -m 0600); "
         "reload mosquitto (SIGHUP) to apply.")


@deploy_app.command()
def acl(
    out: Path = typer.Option(..., "--out", "-o", help="mosquitto ACL file to write."),
    fleet: str = typer.Option("+", "--fleet", help="Fleet name the rules are pinned to, or + for every fleet."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """ACL: each device may touch only its own topics; the coordinator may touch every device's.

    A device publishes only its own update and presence topics and reads only its own task topic and the
    fleet status; the coordinator reads every update and presence and writes every task and the status."""
    from cloud.deploy.security import SecurityError, write_acl

    try:
        write_acl(out, fleet, force=force)
    except SecurityError as exc:
        _fail(str(exc))
    _say(f"{_rel(out)}: ACL for fleet {fleet} (devices: username = client id). Reload mosquitto (SIGHUP) to apply.")


@deploy_app.command()
def systemd(
    inventory: Path = typer.Option(..., "--inventory", "-i", help="fleet.toml: the devices, their ids and profiles."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: <host or id>/fedcmd-agent.service per device "
                                                      "and fedcmd-coordinator.service."),
    prefix: str = typer.Option("/opt/fedcmd", "--prefix", help="Where fedcmd is installed on the machines (a venv: "
                                                               "ExecStart runs PREFIX/bin/fedcmd-edge)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing unit files."),
) -> None:
    """systemd units: one agent unit per device of the inventory, and the coordinator's unit.

    Each agent unit runs `fedcmd-edge run` with the device's id, profile, data, dataset, state dir and
    credentials, under user fedcmd, hardened, with MemoryMax from the profile's memory budget."""
    from cloud.deploy.inventory import InventoryError, load_inventory
    from cloud.deploy.security import OutFile, SecurityError, write_files
    from cloud.deploy.systemd_units import UnitError, render_units

    try:
        inv = load_inventory(inventory)
    except InventoryError as exc:
        for line in exc.lines:  # every problem at once, one line each
            print_error(" ".join(line.split()))
        raise typer.Exit(2) from None
    try:
        units = render_units(inv, prefix)
        # Unit files are not secret: 0644, as systemd expects them under /etc/systemd/system.
        write_files([OutFile(out / rel, text.encode(), 0o644) for rel, text in units.items()], force=force)
    except (UnitError, SecurityError) as exc:
        _fail(str(exc))
    n = len(units) - 1
    _say(f"{_rel(out)}: {n} agent unit{'s' * (n != 1)} (<host or id>/fedcmd-agent.service) and "
         "fedcmd-coordinator.service.")
    _say("Install: copy a device's unit to /etc/systemd/system/ on it, then systemctl enable --now "
         "fedcmd-agent (deploy/README.md).")
