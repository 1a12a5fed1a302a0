"""Runtime ISA dispatch of the native kernels (csrc/bindings.cpp): one build holds the portable, avx2 and
avx512 variants (x86-64), the best the CPU runs is chosen at import, FEDCMD_ISA names one, and every variant
this CPU runs computes what the NumPy oracle computes. A variant the CPU lacks is refused at import (never
a SIGILL), and so is a name the build does not know."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
native = pytest.importorskip("fedcmd_core._native", reason="the native module is not built (NumPy fallback only)")

# Run in a fresh process under one variant: the face's answers for ragged, mixed-storage inputs.
PROBE = r"""
import json, sys
import numpy as np, torch
from fedcmd_core import kernels as k
from fedcmd_core.kernels import fallback as f
rng = np.random.default_rng(7)
out = {"backend": k.backend(), "lanes": k._native.build_info["vector_lanes"]}
W = rng.random((10, 13))
for P in (1, 37, 4096 + 29, 70001):
    b32 = [rng.standard_normal(P).astype(np.float32) for _ in range(13)]
    b16 = [b.astype(np.float16) for b in b32]
    bf = [torch.from_numpy(b).to(torch.bfloat16) for b in b32]
    off = []  # the same values 4 bytes off every vector alignment
    for b in b32:
        raw = np.zeros(P * 4 + 64, np.uint8)
        start = (-raw.ctypes.data) % 64 + 4
        v = raw[start : start + P * 4].view(np.float32)
        v[:] = b
        off.append(v)
    errs = {
        "f32": float(np.abs(k.weighted_aggregate(W, b32) - f.weighted_aggregate(W, b32, np.float32)).max()),
        "f16": float(np.abs(k.weighted_aggregate(W, b16) - f.weighted_aggregate(W, b16, np.float32)).max()),
        "bf16": float(np.abs(k.weighted_aggregate(W, bf) - f.weighted_aggregate(W, [x.float().numpy() for x in bf],
                                                                                 np.float32)).max()),
        "f64": float(np.abs(k._native.weighted_aggregate(W, b32, np.float64)
                            - f.weighted_aggregate(W, b32, np.float64)).max()),
        "unaligned": float(np.abs(k.weighted_aggregate(W, off) - k.weighted_aggregate(W, b32)).max()),
        "scale": float(np.abs(f.weighted_aggregate(W, b32, np.float64)).max()),
    }
    out[f"agg{P}"] = errs
S = rng.standard_normal((9, 50))
out["pairwise"] = float(np.abs(k.wasserstein_pairwise(S) - f.wasserstein_pairwise(S, 1.0)).max())
A = rng.standard_normal((7, 33))
out["cosine"] = float(np.abs(k.cosine_similarity_matrix(A) - f.cosine_similarity_matrix(A, 1e-8)).max())
x = rng.standard_normal(100003).astype(np.float32)
out["read_sum"] = abs(k._native.read_sum(x) - float(x.astype(np.float64).sum()))
print(json.dumps(out))
"""


def _run(code: str, isa: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FEDCMD_ISA", "FEDCMD_NATIVE")}
    if isa is not None:
        env["FEDCMD_ISA"] = isa
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_best_usable_variant_is_chosen_by_default() -> None:
    info = native.build_info
    assert info["usable"] and set(info["usable"]) <= set(info["variants"])
    assert info["variants"][-1] == "portable"  # every build can run anywhere
    if info["arch"] == "x86_64":
        assert "avx2" in info["variants"]  # CMakeLists.txt's default FEDCMD_X86_VARIANTS
    expected = "native-" + (os.environ.get("FEDCMD_ISA") or info["usable"][0])
    from fedcmd_core import kernels

    if os.environ.get("FEDCMD_NATIVE", "").strip().lower() in ("0", "false", "no", "off"):
        assert kernels.backend() == "numpy"  # .ci/run's fallback pass: the module is there, the face ignores it
        expected = kernels.backend()
        return

    assert kernels.backend() == expected == f"native-{native.variant}" == f"native-{info['isa']}"


@pytest.mark.parametrize("variant", native.build_info["usable"])
def test_every_usable_variant_matches_the_numpy_oracle(variant: str) -> None:
    r = _run(PROBE, variant)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["backend"] == f"native-{variant}"
    assert out["lanes"] == {"avx512": 16, "avx2": 8, "portable": 8}[variant]
    for P in (1, 37, 4096 + 29, 70001):
        e = out[f"agg{P}"]
        tol = 1e-5 * max(1.0, e["scale"])  # float32 accumulation over 13 buffers, any summation grouping
        assert e["f32"] <= tol and e["bf16"] <= tol, (P, e)
        assert e["f16"] <= tol, (P, e)
        assert e["f64"] <= 1e-12 * max(1.0, e["scale"]), (P, e)
        assert e["unaligned"] == 0.0, (P, e)  # alignment never changes a result (bit-identical --jobs runs)
    assert out["pairwise"] <= 1e-9 and out["cosine"] <= 1e-12
    assert out["read_sum"] <= 1e-2


def test_a_variant_this_cpu_lacks_or_the_build_lacks_is_refused() -> None:
    info = native.build_info
    lacking = [v for v in info["variants"] if v not in info["usable"]]  # avx512 here: AVX2-only CPU
    code = "from fedcmd_core import kernels; print(kernels.backend())"
    for name in [*lacking, "sse9"]:  # and a name no build has
        r = _run(code, name)
        assert r.returncode != 0, (name, r.stdout)
        assert f"FEDCMD_ISA={name}: this build holds {', '.join(info['variants'])} and this CPU runs " \
               f"{', '.join(info['usable'])}" in r.stderr, r.stderr
    auto = _run(code, "auto")
    assert auto.returncode == 0 and auto.stdout.strip() == f"native-{info['usable'][0]}"


def test_read_sum_sums_what_it_reads() -> None:
    """The roofline's read probe reads every element once; float32 only (a strided view is made contiguous)."""
    x = np.arange(70001, dtype=np.float32) % 7
    assert native.read_sum(x) == float(x.astype(np.float64).sum())
    assert native.read_sum(np.ones(20, np.float32)[::2]) == 10.0
    with pytest.raises(TypeError):
        native.read_sum(np.ones(3, np.float64))
