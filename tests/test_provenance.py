"""Every run records where it came from, in config.json and summary.json: fedcmd's version, the git commit of
the checkout, the partition file's sha256, the command line, torch/numpy versions, the kernels' backend."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_a_run_folder_names_its_code_data_and_command(tmp_path: Path) -> None:
    from fedcmd_core import kernels
    from fedcmd_core.data import PartitionArgs, load_dataset, make_partition

    part = make_partition(load_dataset("digits"), PartitionArgs(client_num=3, alpha=1.0, least_samples=5, seed=1))
    path = tmp_path / "p.npz"
    part.save(path)
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("fedcmd")), "simulate", "--algo", "fedavg", "-d", "digits",
           "--partition", str(path), "-jr", "1", "-ge", "1", "-le", "1", "-tg", "0", "--quiet", "--save_fig", "0",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())["provenance"]
    summary = json.loads((out / "summary.json").read_text())["provenance"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    for p in (config, summary):
        assert p["fedcmd_version"] == metadata.version("fedcmd")
        assert p["git_commit"].split("+")[0] == head
        assert p["partition_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert p["partition_source"] == str(path)
        assert p["numpy"] == np.__version__ and p["torch"] == metadata.version("torch")
        assert p["kernels_backend"] == kernels.backend()
    assert config["command"] == ["fedcmd", *cmd[1:]]  # literal, as typed
    # summary.json: the same line with the output folder as a placeholder (two folders, one command: same file)
    assert summary["command"] == ["fedcmd", *cmd[1:-1], "<this run folder>"]
