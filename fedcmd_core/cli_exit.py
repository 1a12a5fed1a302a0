"""Run a typer app and leave the process without torch's teardown; name the install a missing module needs.

Exit codes of every fedcmd command: 0 done; 1 an unexpected failure; 2 a configuration mistake (fix the
config, a retry will not help); 3 retryable (broker unreachable, too few devices); 4 disk: a file could
not be written (read-only or full disk, a file where a folder should be); 130 interrupted.

At interpreter exit, torch's static destructors touch ~130 MB of library pages and take ~0.5 s
(measured: peak RSS of `import torch` is 519 MB with os._exit, 647 MB with a normal exit). Our
commands have written, flushed and closed everything by the time the app returns, so we skip them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

EXIT_CONFIG = 2
EXIT_RETRY = 3
EXIT_DISK = 4

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
    except OSError as e:
        # Safety net: a DiskError no command caught is still one line and exit 4, not a traceback.
        from fedcmd_core.state_tree import DiskError

        if not isinstance(e, DiskError):
            raise
        print(f"error: disk: {e}", file=sys.stderr)
        code = EXIT_DISK
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
