"""``fedcmd cloud serve|status``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from cloud.cli.apps import new_app
from cloud.cli.errors import fail, print_error

cloud_app = new_app("The coordinator service.")
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
    fleet: str = typer.Option("default", "--fleet", help="fleet name (the topic prefix)"),
    timeout: float = typer.Option(10.0, "--timeout", help="seconds to wait for the broker and the retained status"),
    username: Optional[str] = typer.Option(None, "--username", help="MQTT username (the ACL's `observer`)"),
    password_file: Optional[Path] = typer.Option(None, "--password-file", help="file holding the MQTT password"),
    ca: Optional[Path] = typer.Option(None, "--ca", help="CA certificate (TLS)"),
    cert: Optional[Path] = typer.Option(None, "--cert", help="client certificate (TLS)"),
    key: Optional[Path] = typer.Option(None, "--key", help="client private key (TLS)"),
    watch: bool = typer.Option(False, "--watch", help="keep showing the status as it changes (Ctrl-C to stop)"),
    json_out: bool = typer.Option(False, "--json", help="print the status as JSON (with --watch: one line each)"),
) -> None:
    """Print the coordinator's retained status (--watch: a live table; --json: for scripts)."""
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
    from cloud.cli.status_view import status_json, status_table

    got: dict = {}
    seen = {"count": 0, "at": 0.0}

    def on_status(topic: str, payload: bytes) -> None:
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            doc = None
        if isinstance(doc, dict):  # anything else on the status topic is not a coordinator's
            got.clear()
            got.update(doc)
            seen["count"] += 1
            seen["at"] = time.time()

    transport.subscribe(status_topic(fleet), on_status)
    transport.run_until(lambda: bool(got), timeout)
    if not got:
        transport.close()
        fail(f"no coordinator status for fleet {fleet!r} on {broker}")
    if not watch:
        transport.close()
        if json_out:
            typer.echo(status_json(got))
        else:
            console.print(status_table(got, fleet))
        return
    _watch(transport, got, seen, fleet, json_out)


def _watch(transport: Any, got: dict, seen: dict, fleet: str, json_out: bool) -> None:
    """Show every new retained status until Ctrl-C: a table redrawn in place, or one JSON line each."""
    from rich.live import Live

    from cloud.cli.status_view import status_json, status_table

    shown = 0
    try:
        if json_out:
            while True:
                if seen["count"] != shown:
                    shown = seen["count"]
                    typer.echo(status_json(got))
                transport.run_until(lambda n=shown: seen["count"] != n, 1.0)
        with Live(status_table(got, fleet, seen["at"]), console=console, refresh_per_second=4) as live:
            while True:
                if seen["count"] != shown:
                    shown = seen["count"]
                    live.update(status_table(got, fleet, seen["at"]))
                transport.run_until(lambda n=shown: seen["count"] != n, 1.0)
    except KeyboardInterrupt:
        pass
    finally:
        transport.close()
