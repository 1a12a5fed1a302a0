"""The emulated Pi's cache and its one-line errors, without emulating anything (part of make test; the
emulated device itself is make hil-arm, tests/hil/test_arm.py).

A killed build leaves a ``.building-*`` folder or a layer folder without COMPLETE: both are removed and the
layer is built again, never used; a layer is reused while its hash matches. No qemu, no binfmt entry, a
disabled entry: one line naming what to install or run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hil import arm_rootfs

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDCMD_HIL_ARM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _builder(calls: list[Path]):  # type: ignore[no-untyped-def]
    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "rootfs").mkdir()
        (tmp / "rootfs" / "marker").write_text(str(len(calls)))

    return build


def test_half_built_layers_are_rebuilt_and_complete_ones_reused(cache: Path) -> None:
    digest = "0123456789abcdef"
    cache.mkdir(parents=True)
    # a build killed after its rename would need COMPLETE; one killed before it leaves .building-<...>-<pid>
    (cache / f"base-{digest}" / "rootfs").mkdir(parents=True)
    (cache / f"base-{digest}" / "rootfs" / "half").write_text("killed")
    dead = cache / f".building-base-{digest}-999999999"
    (dead / "rootfs").mkdir(parents=True)
    calls: list[Path] = []
    layer = arm_rootfs._layer("base", digest, _builder(calls))
    assert len(calls) == 1, "an incomplete layer was used instead of rebuilt"
    assert layer == cache / f"base-{digest}"
    assert not (layer / "rootfs" / "half").exists(), "the half-built tree survived the rebuild"
    assert not dead.exists(), "the dead builder's folder was left"
    meta = json.loads((layer / "COMPLETE").read_text())
    assert meta["hash"] == digest and meta["seconds"] >= 0
    assert arm_rootfs._layer("base", digest, _builder(calls)) == layer
    assert len(calls) == 1, "a complete layer was rebuilt"
    # a COMPLETE for another hash (copied or edited by hand) does not pass
    (layer / "COMPLETE").write_text(json.dumps({"hash": "something-else"}))
    arm_rootfs._layer("base", digest, _builder(calls))
    assert len(calls) == 2


def test_a_new_recipe_hash_replaces_the_old_layer(cache: Path) -> None:
    calls: list[Path] = []
    old = arm_rootfs._layer("agent", "aaaaaaaaaaaaaaaa", _builder(calls))
    new = arm_rootfs._layer("agent", "bbbbbbbbbbbbbbbb", _builder(calls))
    assert len(calls) == 2 and new.is_dir() and not old.exists()


def test_failed_build_leaves_no_layer(cache: Path) -> None:
    def broken(tmp: Path) -> None:
        (tmp / "rootfs").mkdir()
        raise arm_rootfs.ArmError("debootstrap of the arm64 rootfs failed (exit 1)")

    with pytest.raises(arm_rootfs.ArmError):
        arm_rootfs._layer("base", "cccccccccccccccc", broken)
    assert not (cache / "base-cccccccccccccccc").exists()
    calls: list[Path] = []
    arm_rootfs._layer("base", "cccccccccccccccc", _builder(calls))  # the next run builds it (and clears the rest)
    assert len(calls) == 1 and not list(cache.glob(".building-*"))


def test_recipe_hashes_follow_their_inputs() -> None:
    assert re.fullmatch(r"[0-9a-f]{16}", arm_rootfs.base_hash())
    assert arm_rootfs.agent_hash() != arm_rootfs.base_hash()
    assert arm_rootfs.source_hash() == arm_rootfs.source_hash()
    names = {str(p.relative_to(REPO)) for p in arm_rootfs.source_files()}
    assert {"pyproject.toml", "CMakeLists.txt", "csrc/bindings.cpp", "edge_agent/cli.py"} <= names
    assert not any(n.startswith(("tests/", ".venv/", "build/")) for n in names)


@pytest.mark.skipif(os.geteuid() != 0, reason="the checks after the tool lookup need root")
def test_check_without_qemu_names_what_to_install(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("git", "env"):  # nothing else: no debootstrap, no qemu-aarch64-static
        real = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        (bindir / tool).symlink_to(real)
    proc = subprocess.run(
        [sys.executable, str(HERE / "arm_rootfs.py"), "check"],
        capture_output=True,
        text=True,
        env={"PATH": str(bindir), "HOME": str(tmp_path)},
        timeout=60,
    )
    if os.uname().machine == "aarch64":
        assert proc.returncode == 0
        return
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        "debootstrap and qemu-aarch64-static not found: apt-get install -y qemu-user-static binfmt-support debootstrap"
    ], proc.stdout + proc.stderr
    assert proc.stderr == ""


@pytest.mark.skipif(os.geteuid() != 0 or os.uname().machine == "aarch64", reason="root on a non-aarch64 machine")
def test_check_binfmt_states(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("debootstrap", "qemu-aarch64-static"):
        (tools / tool).write_text("#!/bin/sh\n")
        (tools / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    binfmt = tmp_path / "binfmt_misc"
    monkeypatch.setattr(arm_rootfs, "BINFMT", binfmt)
    binfmt.mkdir()
    assert "binfmt_misc is not mounted" in (arm_rootfs.why_unavailable() or "")
    (binfmt / "status").write_text("enabled\n")
    assert arm_rootfs.why_unavailable() == (
        "no qemu-aarch64 binfmt entry: update-binfmts --enable qemu-aarch64 (package binfmt-support)"
    )
    entry = binfmt / "qemu-aarch64"
    entry.write_text("disabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\n")
    assert arm_rootfs.why_unavailable() == (
        "the qemu-aarch64 binfmt entry is disabled: update-binfmts --enable qemu-aarch64"
    )
    entry.write_text("enabled\ninterpreter /usr/bin/qemu-aarch64\nflags: \n")
    assert "lacks the F flag" in (arm_rootfs.why_unavailable() or "")
    entry.write_text("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\n")
    assert arm_rootfs.why_unavailable() is None


def test_install_script_pins_are_the_makefiles() -> None:
    make = (REPO / "Makefile").read_text()
    pins = re.search(r"ifeq \(\$\(ARCH\),aarch64\)\nTORCH_PINS := (.+)\nelse\nTORCH_PINS := (.+)\n", make)
    assert pins is not None, "the Makefile's TORCH_PINS block changed shape"
    script = arm_rootfs.INSTALL_SCRIPT.read_text()
    assert f'TORCH_PINS_AARCH64="{pins.group(1)}"' in script
    assert f'TORCH_PINS_X86_64="{pins.group(2)}"' in script


def test_install_script_refuses_bad_targets_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "FEDCMD_PREFIX": str(tmp_path / "venv")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", str(arm_rootfs.INSTALL_SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60
        )

    fake = tmp_path / "fedcmd-0.1.0-cp311-cp311-linux_armv7l.whl"
    fake.write_bytes(b"not really")
    cases = {
        ("install", str(tmp_path / "missing.whl")): f"error: {tmp_path / 'missing.whl'} does not exist",
        ("install", str(fake)): f"error: {fake} is a linux_armv7l wheel; this machine is {os.uname().machine}",
        ("infer", str(tmp_path)): f"error: {tmp_path} is neither a .whl nor a fedcmd checkout (no pyproject.toml)",
        ("bogus",): "error: usage:",
    }
    for args, line in cases.items():
        proc = run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(line), (args, proc.stderr)
    assert not (tmp_path / "venv").exists()
