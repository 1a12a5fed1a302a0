"""Run a typer app and leave the process without torch's teardown; name the install a missing module needs.

At interpreter exit, torch's static destructors touch ~130 MB of library pages and take ~0.5 s
(measured: peak RSS of `import torch` is 519 MB with os._exit, 647 MB with a normal exit). Our
commands have written, flushed and closed everything by the time the app returns, so we skip them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

# Top-level modules of the optional installs -> the extra that brings them (pyproject.toml). A device with
# only `fedcmd[edge-infer]` that runs a training command gets this hint instead of a traceback.
EXTRA_OF = {
    **dict.fromkeys(
        ("torch", "torchvision", "scipy", "sklearn", "mlxtend", "safetensors", "pydantic", "matplotlib",
         "cryptography", "paho", "amqtt", "onnx"),
        "full",
    ),
    "onnxruntime": "edge-infer",
    "PIL": "edge-infer",
}


def missing_install_hint(e: ModuleNotFoundError) -> str | None:
    """The one-line error for a module an optional install provides; None for anything else."""
    top = (e.name or "").split(".")[0]
    extra = EXTRA_OF.get(top)
    if extra is None:
        return None
    return f"error: this command needs {top!r}, which is not installed: pip install 'fedcmd[{extra}]'"


def run_cli(app: Callable[[], object]) -> None:
    code: int = 0
    try:
        app()
    except ModuleNotFoundError as e:
        hint = missing_install_hint(e)
        if hint is None:
            raise
        print(hint, file=sys.stderr)
        code = 2
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            code = 1
        else:
            code = int(e.code or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
