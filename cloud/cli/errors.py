"""How every ``fedcmd`` command reports a user mistake: ``error: ...`` on stderr, exit code 2, no traceback.

Messages are escaped: they often quote TOML tables such as ``[hp.fedcmd]``, which rich would otherwise
take for markup and silently drop.
"""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

err_console = Console(stderr=True)


def print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """One error line and exit ``code``: 2 a configuration mistake, 3 retryable, 4 disk."""
    print_error(message)
    raise typer.Exit(code)
