"""`fedcmd --help`, every sub-command's --help and every usage error answer without importing torch (it
costs ~0.5 GB and 1-2 s a process); torch comes in only with the command that trains or loads data."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from typer.testing import CliRunner
from cloud.cli.main import app
result = CliRunner().invoke(app, sys.argv[1:])
assert "torch" not in sys.modules, "torch was imported"
print("exit", result.exit_code)
"""


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--help"], 0),
        (["simulate", "--help"], 0),
        (["experiment", "--help"], 0),
        (["data", "partition", "--help"], 0),
        (["bench", "--help"], 0),
        (["deploy", "certs", "--bogus"], 2),
        (["simulte"], 2),
        (["simulate", "--algo", "fedcdm"], 2),  # a mistyped name: one line before torch is imported
        (["simulate", "-d", "imagenet21k", "-m", "lenet5"], 2),
        (["algorithms", "--help"], 0),
        (["--version"], 0),
    ],
)
def test_help_and_usage_errors_do_not_import_torch(args: list[str], code: int) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"exit {code}"


def test_the_probe_sees_torch_when_a_command_needs_it() -> None:
    probe = "import sys\nfrom fedcmd_core.data import load_dataset\nload_dataset('digits')\n" \
        "print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"
