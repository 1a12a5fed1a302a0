"""The aarch64 part of the hil suite (collected only with ``--hil-arm``: ``make hil-arm``): the mixed run,
the aarch64-vs-x86 update of one task, the native kernels on aarch64 against the NumPy oracle, the aarch64
wheel in a clean rootfs, the pure-Python install without python3-dev, and the one-line errors.

The conformance suite (test_conformance.py, test_device_limits.py) runs against the same mixed fleet, so
the emulated Pi registers, trains, survives broker restarts and predicts there like the x86 devices.
Measured figures go to the terminal summary and, with ``FEDCMD_HIL_ARM_REPORT=DIR``, to DIR/*.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hil import arm_rootfs
from hil.arm_fleet import ARM_INDEX, PI_PYTHON, PI_STATE, MixedFleet
from hil.coordinator import answered, sampled
from hil.fleet import FleetUnderTest
from hil.netns_fleet import DATASET

pytestmark = [pytest.mark.hil, pytest.mark.timeout(1500)]
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUN_TIMEOUT = 900.0


def mixed(fleet: FleetUnderTest) -> MixedFleet:
    assert isinstance(fleet, MixedFleet), "test_arm.py runs only on the mixed fleet (--hil-arm)"
    return fleet


def record(fleet: MixedFleet, name: str, data: dict[str, Any]) -> None:
    """A measurement: into the terminal summary, and into $FEDCMD_HIL_ARM_REPORT/<name>.json when set."""
    fleet.report.append(f"aarch64 {name}: {json.dumps(data, sort_keys=True)}")
    out = os.environ.get("FEDCMD_HIL_ARM_REPORT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process of this machine (for an emulated one: guest + qemu's translator)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def run_sampling_rss(argv: list[str], timeout: float) -> tuple[subprocess.CompletedProcess[bytes], float]:
    """Run ``argv``; its result and the peak RSS (MB) seen by sampling its VmRSS every 10 ms."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith(("VmHWM:", "VmRSS:")):
                        peak[0] = max(peak[0], int(line.split()[1]) / 1024)
            except (OSError, ValueError):
                pass
            time.sleep(0.01)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate(timeout=timeout)
    t.join(5)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err), peak[0]


# ------------------------------------------------------------------------------------------ the mixed run
@pytest.fixture(scope="module")
def mixed_run(fleet: FleetUnderTest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    f = mixed(fleet)
    workdir = tmp_path_factory.mktemp("mixed")
    t0 = time.monotonic()
    run = f.coordinator(workdir, rounds=3)
    rows = run.wait(RUN_TIMEOUT)
    summary = json.loads((run.out / "summary.json").read_text())
    return {"rows": rows, "summary": summary, "seconds": time.monotonic() - t0, "log": run.log_tail()}


def test_mixed_architecture_run_aggregates_the_aarch64_updates(
    fleet: FleetUnderTest, mixed_run: dict[str, Any]
) -> None:
    f = mixed(fleet)
    rows = mixed_run["rows"]
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    for r in rows:
        assert sampled(r) == {0, 1, ARM_INDEX}, r
        assert answered(r) == {0, 1, ARM_INDEX}, f"round {r['round']}: {r}\n{f.explain()}"
    rejected = mixed_run["summary"].get("rejected_updates") or {}
    assert not rejected, f"the coordinator rejected updates: {rejected}"
    seconds = [float(r["seconds"]) for r in rows]
    record(
        f,
        "mixed-run",
        {
            "rounds": len(rows),
            "round_seconds": seconds,
            "run_seconds": round(mixed_run["seconds"], 1),
            "devices": [f"{d.id}:{d.profile}:{d.arch or 'x86_64'}" for d in f.devices],
        },
    )


def _replay(
    argv_prefix: list[str], task: str, spec: str, data: str, out: str, cwd: Path | None = None, timeout: float = 900
) -> dict[str, Any]:
    proc = subprocess.run(
        [
            *argv_prefix,
            "--task",
            task,
            "--spec",
            spec,
            "--data",
            data,
            "-d",
            DATASET,
            "--client-id",
            str(ARM_INDEX),
            "--profile",
            "rpi4",
            "--out",
            out,
        ],
        capture_output=True,
        timeout=timeout,
        cwd=cwd,
    )
    assert proc.returncode == 0, f"replay failed: {proc.stderr.decode(errors='replace')[-3000:]}"
    return json.loads(Path(f"{out}.json").read_text()) if not out.startswith("/tmp/fedcmd-hil") else {}


def _compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, Any]:
    assert sorted(a) == sorted(b), f"different tensors: {sorted(a)} vs {sorted(b)}"
    per: dict[str, Any] = {}
    num = den = 0.0
    for k in sorted(a):
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.shape == y.shape and x.dtype == y.dtype, f"{k}: {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}"
        if not np.issubdtype(x.dtype, np.floating):
            per[k] = {"equal": bool(np.array_equal(x, y))}
            continue
        d = np.abs(x.astype(np.float64) - y.astype(np.float64))
        num += float((d**2).sum())
        den += float((y.astype(np.float64) ** 2).sum())
        spacing = np.spacing(np.abs(y).astype(x.dtype)).astype(np.float64)
        per[k] = {
            "max_abs": float(d.max(initial=0)),
            "max_ulps": float((d / np.maximum(spacing, 1e-45)).max(initial=0)),
            "differing": int((d > 0).sum()),
            "size": int(d.size),
        }
    return {
        "relative_l2": (num / den) ** 0.5 if den else 0.0,
        "max_abs": max((v.get("max_abs", 0.0) for v in per.values()), default=0.0),
        "identical_tensors": sum(1 for v in per.values() if v.get("max_abs", 1) == 0 or v.get("equal")),
        "tensors": len(per),
        "per_tensor": per,
    }


def test_aarch64_update_vs_x86_for_the_same_task(
    fleet: FleetUnderTest, mixed_run: dict[str, Any], tmp_path: Path
) -> None:
    """The first task the Pi got (fresh state), answered on x86 by the same code from the same state and data."""
    from protocols.codec import decode

    f = mixed(fleet)
    assert f.capture is not None and f.session is not None and f.partition is not None
    exchange = f.capture.first_exchange()
    assert exchange is not None, f"no task/update of the Pi captured (frames: {f.capture.seen})"
    task, update = exchange
    assert task.task_kind == "fit", f"the Pi's first task was a {task.task_kind} task"
    (tmp_path / "task.frame").write_bytes(task.raw)
    spec = tmp_path / "runspec.json"
    shutil.copy2(f.session.path(f"{PI_STATE}/runspec.json"), spec)
    header, live = decode(update.raw)
    # 1. x86, this machine's .venv (native AVX2 kernels, x86 torch)
    t0 = time.monotonic()
    meta_x86 = _replay(
        [sys.executable, str(HERE / "arm_replay.py")],
        str(tmp_path / "task.frame"),
        str(spec),
        str(f.partition),
        str(tmp_path / "x86.npz"),
        cwd=REPO,
    )
    x86_s = time.monotonic() - t0
    # 2. aarch64 again, in the rootfs: the replay is what the agent computed (else the comparison means nothing)
    stage = f.session.path("/tmp/fedcmd-hil")
    for name, src in (
        ("arm_replay.py", HERE / "arm_replay.py"),
        ("task.frame", tmp_path / "task.frame"),
        ("runspec.json", spec),
    ):
        shutil.copy2(src, stage / name)
    t0 = time.monotonic()
    _replay(
        f.session.argv([PI_PYTHON, "/tmp/fedcmd-hil/arm_replay.py"]),
        "/tmp/fedcmd-hil/task.frame",
        "/tmp/fedcmd-hil/runspec.json",
        "/var/lib/fedcmd/partition.npz",
        "/tmp/fedcmd-hil/arm.npz",
    )
    arm_s = time.monotonic() - t0
    meta_arm = json.loads((stage / "arm.npz.json").read_text())
    arm = dict(np.load(stage / "arm.npz"))
    x86 = dict(np.load(tmp_path / "x86.npz"))
    assert meta_arm["machine"] == "aarch64" and meta_x86["machine"] == "x86_64", (meta_arm, meta_x86)
    # backend() names the ISA variant (issue 13): aarch64 builds only the portable (NEON) one
    assert meta_arm["backend"] == "native-portable" and meta_x86["backend"].startswith("native-"), (meta_arm, meta_x86)
    same_arch = _compare(arm, live)
    assert same_arch["max_abs"] == 0.0, f"the aarch64 replay differs from the Pi's live update: {same_arch}"
    assert meta_arm["num_samples"] == header.num_samples
    cross = _compare(x86, live)
    loss_x86 = meta_x86["metrics"]
    loss_arm = header.payload.get("metrics", {})
    data = {
        "round": task.round + 1,
        "kind": task.task_kind,
        "x86_vs_aarch64": {k: v for k, v in cross.items() if k != "per_tensor"},
        "per_tensor": cross["per_tensor"],
        "aarch64_replay_vs_live": "bit-identical",
        "metrics_x86": loss_x86,
        "metrics_aarch64": loss_arm,
        "info_x86": meta_x86["info"],
        "info_aarch64": header.payload.get("info"),
        "torch": {"x86": meta_x86["torch"], "aarch64": meta_arm["torch"]},
        "replay_seconds": {"x86": round(x86_s, 1), "aarch64_emulated": round(arm_s, 1)},
    }
    record(f, "update-difference", data)
    # same code, same data, same seeded RNG: only float rounding may differ (oneDNN vs the aarch64 kernels'
    # summation orders); anything larger is a real divergence
    assert cross["relative_l2"] < 1e-4, f"aarch64 and x86 updates differ beyond float rounding: {data}"
    assert meta_x86["num_samples"] == header.num_samples


# ------------------------------------------------------------------------------------------ kernels
def test_native_kernels_on_aarch64_match_the_numpy_oracle(fleet: FleetUnderTest) -> None:
    """tests/test_native_kernels.py (native vs NumPy fallback vs POT/SciPy; no bench, no CUDA) in the rootfs."""
    f = mixed(fleet)
    assert f.session is not None
    s = f.session
    backend = s.run(
        [PI_PYTHON, "-c", "import fedcmd_core.kernels as k, platform; print(k.backend(), platform.machine())"],
        timeout=300,
    )
    assert backend.stdout.decode().split() == ["native-portable", "aarch64"], backend.stdout + backend.stderr
    pip = s.run(
        [f"{arm_rootfs.AGENT_PREFIX}/bin/pip", "install", "-q", "pytest>=8", "hypothesis>=6.100", "pot>=0.9"],
        timeout=900,
    )
    assert pip.returncode == 0, pip.stderr.decode(errors="replace")[-2000:]
    dest = s.path("/tmp/fedcmd-kernel-tests")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "tests" / "test_native_kernels.py", dest / "test_native_kernels.py")
    t0 = time.monotonic()
    proc = subprocess.run(
        s.argv(
            [
                "/bin/sh",
                "-c",
                f"cd /tmp/fedcmd-kernel-tests && FEDCMD_NATIVE=1 OMP_NUM_THREADS=2 {PI_PYTHON} -m pytest "
                "-q -p no:cacheprovider --noconftest -k 'not bench and not cuda' test_native_kernels.py",
            ]
        ),
        capture_output=True,
        timeout=1200,
    )
    seconds = time.monotonic() - t0
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, f"native kernel tests failed on aarch64:\n{out[-4000:]}{proc.stderr.decode()[-2000:]}"
    last = [ln for ln in out.splitlines() if " passed" in ln]
    assert last and "failed" not in last[-1], out[-2000:]
    assert "skipped" not in last[-1], f"kernel tests skipped on aarch64: {last[-1]}"
    record(f, "native-kernels", {"result": last[-1].strip(" ="), "seconds": round(seconds, 1)})


# ------------------------------------------------------------------------------------------ wheel, sizes, RSS
def test_aarch64_wheel_in_a_clean_rootfs_predicts_and_its_sizes(fleet: FleetUnderTest, tmp_path: Path) -> None:
    """`install-agent.sh infer WHEEL` (fedcmd[edge-infer], no torch) in a rootfs where fedcmd never was; its
    `fedcmd-edge predict` on the Pi's own exported model gives what ONNX Runtime gives here."""
    from edge_agent.inference import Predictor

    f = mixed(fleet)
    assert f.session is not None
    wheel = arm_rootfs.wheel()
    pi = f.pi
    model = f.session.path(pi.model_path)
    deadline = time.monotonic() + 120
    while not (model.is_file() and model.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(1)
    assert model.is_file(), f"the Pi exported no model at {pi.model_path}"
    x = f.sample_inputs(pi, 64)
    np.save(tmp_path / "inputs.npy", x)
    shutil.copy2(model, tmp_path / "model.onnx")
    clean = arm_rootfs.SessionRoot(
        tmp_path / "clean", lowers=[arm_rootfs.base_layer() / "rootfs"], install_current=False
    )
    try:
        stage = clean.path("/tmp/in")
        stage.mkdir(parents=True, exist_ok=True)
        for src in (wheel, arm_rootfs.INSTALL_SCRIPT, tmp_path / "inputs.npy", tmp_path / "model.onnx"):
            shutil.copy2(src, stage / src.name)
        t0 = time.monotonic()
        inst = clean.run(["sh", "/tmp/in/install-agent.sh", "infer", f"/tmp/in/{wheel.name}"], timeout=1200)
        install_s = time.monotonic() - t0
        assert inst.returncode == 0, inst.stderr.decode(errors="replace")[-3000:]
        assert "kernels: native" in inst.stdout.decode(), inst.stdout
        torch_there = clean.run(["/opt/fedcmd/bin/python", "-c", "import torch"], timeout=300)
        assert torch_there.returncode != 0, "torch is installed in an edge-infer venv"
        sp = clean.run(["/opt/fedcmd/bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
        site = clean.path(sp.stdout.decode().strip())
        total = sum(p.stat().st_size for p in site.rglob("*") if p.is_file() and not p.is_symlink())
        lean = sum(
            p.stat().st_size
            for p in site.rglob("*")
            if p.is_file()
            and not p.is_symlink()
            and not p.relative_to(site).parts[0].startswith(("pip", "setuptools", "_distutils_hack"))
        )
        sizes = {}
        for top in site.iterdir():
            key = top.name.split("-")[0].split(".")[0]
            n = sum(p.stat().st_size for p in ([top] if top.is_file() else top.rglob("*")) if p.is_file())
            sizes[key] = sizes.get(key, 0) + n
        biggest = dict(sorted(((k, round(v / 1e6, 1)) for k, v in sizes.items()), key=lambda kv: -kv[1])[:6])
        argv = clean.argv(
            ["/opt/fedcmd/bin/fedcmd-edge", "predict", "--model", "/tmp/in/model.onnx", "--json", "/tmp/in/inputs.npy"]
        )
        pred, rss = run_sampling_rss(argv, 600)
        assert pred.returncode == 0, pred.stderr.decode(errors="replace")[-2000:]
        got = [p["class"] for p in json.loads(pred.stdout)]
        want = [p.label for p in Predictor(tmp_path / "model.onnx").predict(tmp_path / "inputs.npy")]
        assert got == want, "the aarch64 predict disagrees with ONNX Runtime here"
        lean_argv = clean.argv(
            [
                "/opt/fedcmd/bin/python",
                "-m",
                "edge_agent.inference",
                "--model",
                "/tmp/in/model.onnx",
                "/tmp/in/inputs.npy",
            ]
        )
        lean_pred, lean_rss = run_sampling_rss(lean_argv, 600)
        assert lean_pred.returncode == 0, lean_pred.stderr.decode(errors="replace")[-2000:]
        baseline, base_rss = run_sampling_rss(clean.argv(["/opt/fedcmd/bin/python", "-c", "pass"]), 300)
        assert baseline.returncode == 0
    finally:
        clean.close()
    data = {
        "wheel": wheel.name,
        "wheel_mb": round(wheel.stat().st_size / 1e6, 2),
        "install_seconds_emulated": round(install_s, 1),
        "site_packages_mb": round(total / 1e6, 1),
        "site_packages_mb_without_pip_setuptools": round(lean / 1e6, 1),
        "largest_mb": biggest,
        "predict_64_peak_rss_mb_emulated": round(rss, 1),
        "inference_module_peak_rss_mb_emulated": round(lean_rss, 1),
        "python_pass_peak_rss_mb_emulated": round(base_rss, 1),
    }
    record(f, "edge-infer-install", data)


def test_training_agent_rss_on_aarch64(fleet: FleetUnderTest, mixed_run: dict[str, Any]) -> None:
    """Peak RSS of the Pi's `fedcmd-edge run` (LeNet-5, the aarch64 CPU build of torch) after the mixed run."""
    f = mixed(fleet)
    pi = f.pi
    assert pi.pid is not None
    peak = peak_rss_mb(pi.pid)
    x86 = [peak_rss_mb(d.pid) for d in f.devices if d.id != ARM_INDEX and d.pid is not None]
    cgroup = None
    if pi.confinement is not None and pi.confinement.procs_files:
        peak_file = pi.confinement.procs_files[0].parent / "memory.peak"
        if peak_file.exists():
            cgroup = int(peak_file.read_text().split()[0]) / 2**20
    record(
        f,
        "training-agent-rss",
        {
            "aarch64_emulated_vmhwm_mb": round(peak, 1),
            "aarch64_cgroup_memory_peak_mb": None if cgroup is None else round(cgroup, 1),
            "x86_agents_vmhwm_mb": [round(v, 1) for v in x86],
            "rpi4_budget_mb": 1536,
        },
    )
    assert peak < 1536, f"the Pi agent peaked at {peak:.0f} MB, over the rpi4 budget"


# ------------------------------------------------------------------------------------------ bad input
def test_without_python3_dev_the_install_falls_back_to_numpy(fleet: FleetUnderTest, tmp_path: Path) -> None:
    """The base layer has g++ and cmake but no python3-dev: `pip install SOURCE` works, kernels are NumPy."""
    f = mixed(fleet)
    bare = arm_rootfs.SessionRoot(
        tmp_path / "nodev", lowers=[arm_rootfs.base_layer() / "rootfs"], install_current=False
    )
    try:
        has_dev = bare.run(["sh", "-c", "dpkg -s python3-dev >/dev/null 2>&1 || ls /usr/include/python3*/Python.h"])
        assert has_dev.returncode != 0, "the base layer has the Python headers: this test would test nothing"
        assert bare.run(["sh", "-c", "command -v g++ && command -v cmake"]).returncode == 0, "no compiler in the base"
        src = arm_rootfs._copy_source(bare.root)
        t0 = time.monotonic()
        proc = bare.run(["sh", "-c", f"python3 -m venv /tmp/v && /tmp/v/bin/pip install -v {src}"], timeout=1500)
        out = (proc.stdout + proc.stderr).decode(errors="replace")
        assert proc.returncode == 0, f"pip install without python3-dev failed:\n{out[-3000:]}"
        assert "the Python development headers were not found" in out, out[-3000:]
        backend = bare.run(["/tmp/v/bin/python", "-c", "import fedcmd_core.kernels as k; print(k.backend())"])
        assert backend.stdout.decode().strip() == "numpy", backend.stdout + backend.stderr
    finally:
        bare.close()
    record(f, "no-python3-dev", {"install_seconds_emulated": round(time.monotonic() - t0, 1), "backend": "numpy"})


def test_aarch64_wheel_on_x86_says_so_in_one_line(tmp_path: Path) -> None:
    wheel = arm_rootfs.wheel()
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--target", str(tmp_path / "t"), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode != 0
    errors = [ln for ln in pip.stderr.splitlines() if ln.startswith("ERROR")]
    assert len(errors) == 1 and "is not a supported wheel on this platform" in errors[0], pip.stderr
    script = subprocess.run(
        ["sh", str(arm_rootfs.INSTALL_SCRIPT), "install", str(wheel)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FEDCMD_PREFIX": str(tmp_path / "venv")},
    )
    assert script.returncode == 2
    assert script.stderr.strip().splitlines() == [
        f"error: {wheel} is a linux_aarch64 wheel; this machine is {os.uname().machine}"
    ], script.stderr
    assert not (tmp_path / "venv").exists(), "the script made a venv before refusing the wheel"
