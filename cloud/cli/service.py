"""``fedcmd cloud serve|status``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from cloud.cli.errors import fail, print_error

cloud_app = typer.Typer(help="The coordinator service.", no_args_is_help=True)
console = Console()


@cloud_app.command()
def serve(config: Path = typer.Option(..., "--config", help="cloud.toml: broker, fleet, rounds, [run] spec")) -> None:
    """Run (or resume from its checkpoint) a federated training over an MQTT fleet.

    Exit codes: 0 finished, or stopped by SIGTERM / Ctrl-C (its status says "stopped"; run again to resume);
    2 a mistake in the config; 3 the broker unreachable or too few devices online (worth a retry);
    4 disk: the checkpoint or run folder could not be written (read-only or full disk; the previous
    checkpoint is kept, run again once fixed to resume).
    """
    from cloud.config import ConfigError
    from cloud.service.serve import Stopped, Unavailable, load_serve_config
    from cloud.service.serve import serve as run_service
    from fedcmd_core.cli_exit import EXIT_DISK, EXIT_RETRY
    from fedcmd_core.state_tree import DiskError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        records = run_service(load_serve_config(config))
    except ConfigError as e:
        fail(str(e))
        return
    except Unavailable as e:  # exit 3, not 2: a service manager may retry this, not a config mistake
        print_error(str(e))
        raise typer.Exit(EXIT_RETRY) from None
    except DiskError as e:
        print_error(f"disk: {e}")
        raise typer.Exit(EXIT_DISK) from None
    except Stopped as e:
        console.print(f"stopped ({e}); run the same command again to resume from the last checkpoint")
        return
    console.print(f"finished {len(records)} rounds")


@cloud_app.command()
def status(
    broker: str = typer.Option(..., "--broker", help="mqtt://host:port or mqtts://host:port"),
    fleet: str = typer.Option("default", "--fleet"),
    timeout: float = typer.Option(10.0, "--timeout", help="seconds to wait for the broker and the retained status"),
    username: Optional[str] = typer.Option(None, "--username", help="MQTT username (the ACL's `observer`)"),
    password_file: Optional[Path] = typer.Option(None, "--password-file", help="file holding the MQTT password"),
    ca: Optional[Path] = typer.Option(None, "--ca", help="CA certificate (TLS)"),
    cert: Optional[Path] = typer.Option(None, "--cert", help="client certificate (TLS)"),
    key: Optional[Path] = typer.Option(None, "--key", help="client private key (TLS)"),
) -> None:
    """Print the coordinator's retained status."""
    from protocols.mqtt import AddressError, CredentialsError, connect
    from protocols.topics import status_topic
    from protocols.transport import TransportError

    try:
        transport = connect(broker, f"{fleet}-status-reader", username=username, password_file=password_file, ca=ca,
                            cert=cert, key=key, connect_timeout=timeout)
    except (CredentialsError, AddressError) as e:
        fail(str(e))
    except TransportError as e:
        fail(str(e), 3)  # the broker is not there (yet): retryable
    got: dict = {}

    def on_status(topic: str, payload: bytes) -> None:
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            doc = None
        if isinstance(doc, dict):  # anything else on the status topic is not a coordinator's
            got.update(doc)

    transport.subscribe(status_topic(fleet), on_status)
    transport.run_until(lambda: bool(got), timeout)
    transport.close()
    if not got:
        fail(f"no coordinator status for fleet {fleet!r} on {broker}")
    table = Table(title=f"fleet {fleet}")
    table.add_column("field")
    table.add_column("value")
    for key in ("state", "next_round", "global_epoch", "online", "profiles", "rejected"):
        table.add_row(key, str(got.get(key)))
    last = got.get("last_round") or {}
    for key, value in last.items():
        table.add_row(f"last round {key}", str(value))
    run = got.get("run") or {}
    table.add_row("algorithm", f"{run.get('algo')} {run.get('hp') or ''}")
    console.print(table)
