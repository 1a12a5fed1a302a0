"""The ``fedcmd`` command (and ``python -m cloud``).

The CLI module is imported inside ``run_cli``: on a device with only ``fedcmd[edge-infer]`` a missing
training dependency (pydantic, torch, ...) becomes one line naming the install, not a traceback.
"""

from __future__ import annotations

import importlib


def main() -> None:
    from fedcmd_core.cli_exit import run_cli

    run_cli(lambda: importlib.import_module("cloud.cli.main").app())


if __name__ == "__main__":
    main()
