"""Disk errors are one line and exit 4, the previous file is left intact and no temporary file is left.

As root, chmod does not stop writes, so full and read-only disks are injected at the OS-call boundary
save_state_file uses (os.write, os.fsync, os.replace) for the in-process tests; the command-line tests use
paths below a regular file (NotADirectoryError), which no user can write either.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cloud.cli.main import app
from cloud.config import resolve
from fedcmd_core.state_tree import DiskError, check_writable, load_state_file, save_state_file

FEDCMD = Path(sys.executable).parent / "fedcmd"
# a fast run: 10 synthetic devices, every one sampled, one local epoch
TINY = ["--algo", "fedavg", "-d", "synthetic", "-m", "2nn", "-cn", "6", "-jr", "1.0", "-ge", "2", "-le", "1",
        "-tg", "0", "--quiet"]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name or "probe" in p.name or ".partial" in p.name)


def _fail_on(call: str, err: int, after_bytes: int | None = None):
    """A stand-in for os.<call> that fails with ``err``; os.write first really writes ``after_bytes``."""
    real = getattr(os, call)

    def fake(*args):
        if call == "write" and after_bytes is not None:
            real(args[0], bytes(args[1][:after_bytes]))  # a partial temp file really lands on disk
        raise OSError(err, os.strerror(err))

    return fake


@pytest.mark.parametrize(
    ("call", "err"),
    [("write", errno.ENOSPC), ("fsync", errno.EIO), ("replace", errno.EROFS), ("open", errno.EROFS)],
)
def test_failed_save_leaves_the_previous_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, err: int
) -> None:
    path = tmp_path / "ckpt.safetensors"
    save_state_file(path, {"round": 1, "w": np.arange(1000, dtype=np.float32)})
    before = path.read_bytes()
    with monkeypatch.context() as m:
        m.setattr(os, call, _fail_on(call, err, after_bytes=100))
        with pytest.raises(DiskError) as caught:
            save_state_file(path, {"round": 2, "w": np.ones(1000, dtype=np.float32)})
    assert isinstance(caught.value, OSError) and caught.value.errno == err
    assert str(path) in str(caught.value) and os.strerror(err) in str(caught.value)
    assert path.read_bytes() == before  # the previous checkpoint, untouched
    values, _ = load_state_file(path)
    assert values["round"] == 1
    assert _leftovers(tmp_path) == [], "a temporary file was left behind"


def test_save_below_a_file_is_a_disk_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(DiskError) as caught:
        save_state_file(blocker / "ckpt.safetensors", {"x": 1})
    assert caught.value.errno == errno.ENOTDIR
    with pytest.raises(DiskError, match="--state-dir: cannot write to"):
        check_writable(blocker / "state", "--state-dir")
    assert check_writable(tmp_path / "new" / "dir", "--out").is_dir()
    assert _leftovers(tmp_path) == []


def test_checkpoint_on_a_disk_that_fills_up_mid_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """simulate: the first checkpoint writes fine, the disk is full from the next one on: DiskError, the
    previous checkpoint readable, no temp file (before: a traceback and a .tmp file)."""
    from cloud.sim.simulate import build_and_run

    ckpt = tmp_path / "state" / "ckpt.safetensors"
    cfg = resolve({}, {"algo": "fedavg", "dataset": "synthetic", "model": "2nn", "client_num": 4, "join_ratio": 1.0,
                       "global_epoch": 3, "local_epoch": 1, "test_gap": 0, "checkpoint": ckpt})
    real_replace = os.replace
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(DiskError, match="No space left on device"):
        build_and_run(cfg)
    monkeypatch.undo()
    assert calls["n"] >= 2, "the injected fault never fired"
    values, meta = load_state_file(ckpt)
    assert meta["kind"] == "fedcmd-coordinator-checkpoint" and values["next_round"] in (0, 1)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("flag", ["--out", "--checkpoint", "--state-dir"])
def test_simulate_paths_that_cannot_be_written_exit_4_before_training(tmp_path: Path, flag: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = [*TINY, "--out", str(tmp_path / "run")]
    if flag == "--out":
        args[-1] = str(blocker / "run")
    else:
        args += [flag, str(blocker / "x")]
    if flag == "--out":  # one through the installed command: stderr, exit status, nothing else printed
        done = subprocess.run([str(FEDCMD), "simulate", *args], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
        code, output = done.returncode, done.stderr + done.stdout
    else:
        result = CliRunner().invoke(app, ["simulate", *args])
        code, output = result.exit_code, result.output
    assert code == 4, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: disk: "), output
    assert "Not a directory" in lines[0] and flag in lines[0]
    assert "Traceback" not in output
    assert not (tmp_path / "run").exists()  # failed before the run, not after it
    assert _leftovers(tmp_path) == []


def test_simulate_on_a_read_only_file_system_exits_4(tmp_path: Path) -> None:
    target = Path("/sys/fedcmd-test-run")  # sysfs refuses new entries even to root
    if os.access("/sys", os.W_OK) and _can_mkdir(target):
        pytest.skip("/sys accepts new folders here")
    result = CliRunner().invoke(app, ["simulate", *TINY, "--out", str(target / "run")])
    assert result.exit_code == 4, result.output
    assert "disk: --out: cannot write to /sys/fedcmd-test-run" in result.output
    assert "Traceback" not in result.output


def _can_mkdir(path: Path) -> bool:
    try:
        path.mkdir()
    except OSError:
        return False
    path.rmdir()
    return True


def test_serve_checkpoint_or_out_that_cannot_be_written_exits_4(tmp_path: Path) -> None:
    """Checked before connecting: no broker needed, nothing trained (before: it crashed after round 1)."""
    from protocols.broker import free_port

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for key, where in (("checkpoint", blocker / "ckpt.safetensors"), ("out", blocker / "out")):
        config = tmp_path / f"cloud-{key}.toml"
        paths = {"checkpoint": tmp_path / "ok" / "ckpt.safetensors", "out": tmp_path / "ok-out", key: where}
        config.write_text(
            f'fleet = "lab"\nbroker = "mqtt://127.0.0.1:{free_port()}"\ncheckpoint = "{paths["checkpoint"]}"\n'
            f'out = "{paths["out"]}"\n[run]\nalgo = "fedavg"\ninput_shape = [1, 28, 28]\nnum_classes = 10\n'
            "num_clients = 5\nglobal_epoch = 2\n"
        )
        result = CliRunner().invoke(app, ["cloud", "serve", "--config", str(config)])
        assert result.exit_code == 4, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: disk: {key}: cannot write to"), result.output
        assert "Traceback" not in result.output
    assert _leftovers(tmp_path) == []


def test_serve_checkpoint_failing_after_round_1_is_a_disk_error_with_status_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deployed path: serve() over a real transport (in-memory) with real agents; the disk fills up
    after the first checkpoint. DiskError (exit 4 in the CLI), status 'stopped', previous file intact."""
    import json

    import torch

    from cloud.service.serve import ServeConfig, serve
    from edge_agent.agent import Agent
    from fedcmd_core.runspec import build_client
    from fedcmd_core.strategies import ClientData
    from protocols.memory import MemoryTransport
    from protocols.topics import status_topic

    ckpt = tmp_path / "ckpt.safetensors"
    cfg = ServeConfig(fleet="lab", checkpoint=ckpt, out=tmp_path / "out", join_ratio=1.0, wait_clients=3,
                      round_deadline=30.0, registration_timeout=10.0,
                      run={"algo": "fedavg", "model": "2nn", "input_shape": [4], "num_classes": 3, "num_clients": 3,
                           "global_epoch": 4, "local_epoch": 1})
    transport = MemoryTransport()
    gen = torch.Generator().manual_seed(0)
    for cid in range(3):
        x, y = torch.randn(20, 4, generator=gen), torch.randint(0, 3, (20,), generator=gen)
        client = build_client(cfg.run, cid, ClientData(x[:16], y[:16], x[16:], y[16:]))
        Agent(transport, "lab", cid, client).announce()
    real_replace = os.replace
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] >= 3:  # the start checkpoint and round 1's land; round 2's does not
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(DiskError, match="Read-only file system"):
        serve(cfg, transport=transport)
    monkeypatch.undo()
    values, _ = load_state_file(ckpt)
    assert values["next_round"] == 1  # round 1's checkpoint, intact
    status: dict = {}
    transport.subscribe(status_topic("lab"), lambda t, p: status.update(json.loads(p)))
    transport.run_until(lambda: bool(status), 1)
    assert status["state"] == "stopped"
    assert _leftovers(tmp_path) == []


def test_run_folder_writer_reports_a_disk_error_and_leaves_no_partial_folder(tmp_path: Path) -> None:
    from cloud import run_output
    from cloud.sim.simulate import build_and_run

    result = build_and_run(resolve({}, {"algo": "fedavg", "dataset": "synthetic", "model": "2nn", "client_num": 3,
                                        "join_ratio": 1.0, "global_epoch": 1, "local_epoch": 0, "test_gap": 0}))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(DiskError, match=r"--out: could not write .*Not a directory"):
        run_output.write_run(result, blocker, "log")  # every file of the run lands below a regular file
    out = tmp_path / "run"
    with pytest.raises(DiskError), run_output.staged(out, force=False) as folder:
        (folder / "metrics.csv").write_text("half")
        run_output.write_run(result, blocker, "log")
    assert not out.exists() and _leftovers(tmp_path) == []  # the staged .partial folder is gone
    with run_output.staged(out, force=False) as folder:
        run_output.write_run(result, folder, "log")
    assert (out / "summary.json").is_file() and _leftovers(tmp_path) == []


def test_atomic_write_keeps_the_old_file_when_the_writer_fails_and_keeps_an_explicit_mode(tmp_path: Path) -> None:
    from fedcmd_core.atomic import atomic_write

    path = atomic_write(tmp_path / "f.bin", b"old")

    def half_then_crash(f) -> None:
        f.write(b"new, half")
        raise RuntimeError("the writer died")

    with pytest.raises(RuntimeError, match="the writer died"):
        atomic_write(path, half_then_crash)
    assert path.read_bytes() == b"old" and _leftovers(tmp_path) == []
    atomic_write(path, "text as UTF-8 ✓", mode=0o600)
    assert path.read_text() == "text as UTF-8 ✓" and path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(DiskError, match="could not create the folder"):
        atomic_write(path / "below-a-file" / "x", b"", make_parents=True)
