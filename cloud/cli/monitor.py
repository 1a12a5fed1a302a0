"""``fedcmd monitor RUN_DIR...``: finished runs on the dashboard, their curves overlaid."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console

from cloud.cli.errors import fail

console = Console()


def monitor(
    runs: list[Path] = typer.Argument(..., help="Run folders (metrics.csv + summary.json) to show overlaid."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (non-loopback: FEDCMD_MONITOR_TOKEN)."),
    port: int = typer.Option(8097, "--port", help="Port (0: any free port)."),
    seconds: float = typer.Option(0.0, "--seconds", help="Serve this long, then exit (0: until Ctrl-C)."),
) -> None:
    """Serve finished runs on the live dashboard's page (read-only), curves overlaid for comparison."""
    from pydantic import ValidationError

    from cloud.config import ConfigError
    from cloud.monitor.config import MonitorConfig
    from cloud.monitor.server import serve_state
    from cloud.monitor.state import RunFolderError, from_run_folders
    from fedcmd_core.runspec import first_error

    try:
        state = from_run_folders(runs)
        cfg = MonitorConfig(enabled=True, host=host, port=port)
        server = serve_state(state, cfg)
    except (RunFolderError, ConfigError) as e:
        fail(str(e))
        return
    except ValidationError as e:
        fail(f"--host: {first_error(e)}")
        return
    console.print(f"dashboard: {server.url}  ({len(runs)} runs; Ctrl-C to stop)")
    try:
        if seconds:
            time.sleep(seconds)
        else:
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
