"""The native kernels (fedcmd_core._native) against the NumPy fallback and POT/SciPy, its own argument
checks, the bfloat16 path of the face, sliced Wasserstein, the optional CUDA build and the benchmark.

Tests that need the compiled module skip when it is absent (a machine without a compiler installs
without it, by design), except under FEDCMD_NATIVE=1 (what .ci/run sets), where they fail; everything
else runs on either backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import ot
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcmd_core import kernels as K
from fedcmd_core.kernels import fallback

ROOT = Path(__file__).resolve().parents[1]
TIGHT = {"rtol": 1e-9, "atol": 1e-9}
native = K._native
# FEDCMD_NATIVE=1 (CI): a missing module already fails `from fedcmd_core import kernels`; never skip then.
REQUIRED = os.environ.get("FEDCMD_NATIVE", "").strip().lower() in ("1", "true", "yes", "on")
needs_native = pytest.mark.skipif(
    native is None and not REQUIRED, reason=f"fedcmd_core._native not in use: {K.native_import_error}"
)
HYP = settings(max_examples=40, deadline=None)


def pot_wp(u, v, p, uw=None, vw=None) -> float:
    uw = None if uw is None else np.asarray(uw, float) / np.sum(uw)
    vw = None if vw is None else np.asarray(vw, float) / np.sum(vw)
    return float(ot.wasserstein_1d(np.asarray(u, float), np.asarray(v, float), uw, vw, p=p)) ** (1 / p)


# ---------------------------------------------------------------- strategies: ties, duplicates, zero weights
# Integers from a small pool make ties inside and across distributions common; lengths reach past
# 256 so the radix-sort path of the native kernels is drawn too.
_value = st.one_of(st.floats(-50, 50, allow_nan=False, allow_infinity=False), st.integers(-3, 3).map(float))


@st.composite
def _batch(draw):
    B = draw(st.integers(1, 3))
    n = draw(st.one_of(st.integers(1, 12), st.integers(250, 300)))
    m = draw(st.one_of(st.integers(1, 12), st.integers(250, 300)))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    pool = np.array(draw(st.lists(_value, min_size=1, max_size=8)))
    # mix of a small value pool (duplicates) and continuous values
    u = np.where(rng.random((B, n)) < 0.5, rng.choice(pool, (B, n)), rng.normal(size=(B, n)) * 10)
    v = np.where(rng.random((B, m)) < 0.5, rng.choice(pool, (B, m)), rng.normal(size=(B, m)) * 10)
    weighted = draw(st.sampled_from(["none", "u", "both"]))

    def weights(shape):
        w = rng.random(shape) * (rng.random(shape) < 0.7)  # ~30 % zero weights
        w[:, 0] += (w.sum(axis=1) == 0) * 1.0  # every row keeps a positive total
        return w

    uw = None if weighted == "none" else weights((B, n))
    vw = weights((B, m)) if weighted == "both" else None
    p = draw(st.sampled_from([1.0, 2.0, 3.0, 1.5]))
    return u, v, uw, vw, p


# ---------------------------------------------------------------- wasserstein_1d
@needs_native
@HYP
@given(_batch())
def test_wasserstein_1d_native_equals_fallback_and_pot(case):
    u, v, uw, vw, p = case
    got = native.wasserstein_1d(u, v, p, uw, vw)
    np.testing.assert_allclose(got, fallback.wasserstein_1d(u, v, p, uw, vw), **TIGHT)
    for b in range(u.shape[0]):
        rw = (None if uw is None else uw[b]), (None if vw is None else vw[b])
        np.testing.assert_allclose(got[b], pot_wp(u[b], v[b], p, *rw), **TIGHT)
        if p == 1.0:
            np.testing.assert_allclose(got[b], scipy.stats.wasserstein_distance(u[b], v[b], *rw), **TIGHT)


@needs_native
def test_radix_sort_edge_values():
    # signed zeros, subnormals, huge magnitudes and long runs of duplicates, in the radix path (n >= 256)
    rng = np.random.default_rng(0)
    specials = np.array([0.0, -0.0, 5e-324, -5e-324, 1e150, -1e150, 1.0, -1.0, 2.5])  # squares stay finite
    u = rng.choice(specials, size=(3, 400)) * rng.choice([1.0, 1.0, 0.5], size=(3, 400))
    v = rng.normal(size=(3, 333))
    uw = rng.random((3, 400))
    for p in (1.0, 2.0):
        for w in (None, uw):
            np.testing.assert_allclose(
                native.wasserstein_1d(u, v, p, w, None), fallback.wasserstein_1d(u, v, p, w, None), rtol=1e-12
            )
    S = np.vstack([u[:, :300], rng.normal(size=(2, 300))])
    np.testing.assert_allclose(native.wasserstein_pairwise(S, 1.0), fallback.wasserstein_pairwise(S, 1.0), rtol=1e-12)


# ---------------------------------------------------------------- wasserstein_pairwise
@needs_native
@HYP
@given(
    st.integers(1, 13),
    st.one_of(st.integers(1, 40), st.integers(256, 600)),
    st.sampled_from([1.0, 2.0, 1.5]),
    st.integers(0, 2**31 - 1),
)
def test_wasserstein_pairwise_native_equals_fallback(N, n, p, seed):
    rng = np.random.default_rng(seed)
    S = np.round(rng.normal(size=(N, n)) * rng.uniform(0.1, 5, size=(N, 1)), 1)  # rounding: many ties
    if N > 2:
        S[2] = S[0][::-1]  # same distribution as row 0
    D = native.wasserstein_pairwise(S, p)
    np.testing.assert_allclose(D, fallback.wasserstein_pairwise(S, p), **TIGHT)
    assert np.array_equal(D, D.T) and np.all(np.diag(D) == 0)
    if N > 2:
        assert D[0, 2] == 0.0
    i, j = N // 2, N - 1
    np.testing.assert_allclose(D[i, j], pot_wp(S[i], S[j], p), **TIGHT)


@needs_native
def test_wasserstein_pairwise_parallel_size():
    # large enough for the OpenMP path (N * N * n >= 2**23) and the radix sort
    S = np.random.default_rng(1).exponential(size=(99, 900))
    np.testing.assert_allclose(native.wasserstein_pairwise(S, 1.0), fallback.wasserstein_pairwise(S, 1.0), **TIGHT)


# ---------------------------------------------------------------- sliced_wasserstein
def test_projections_are_pots():
    from ot.sliced import get_random_projections

    np.testing.assert_array_equal(K.projections(7, 13, 42), get_random_projections(7, 13, seed=42).T)
    theta = K.projections(5, 9, 0)
    assert theta.flags.c_contiguous and theta.shape == (9, 5)
    np.testing.assert_allclose(np.linalg.norm(theta, axis=1), 1.0)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("p", [1, 2, 3])
def test_sliced_wasserstein_vs_pot(p, weighted):
    rng = np.random.default_rng(p)
    X, Y = rng.normal(size=(60, 4)), rng.normal(size=(45, 4)) * 2 + 1
    X[:10] = X[10:20]  # duplicated points
    a = rng.random(60) if weighted else None
    b = rng.random(45) if weighted else None
    got = K.sliced_wasserstein(X, Y, n_projections=30, seed=7, p=p, x_weights=a, y_weights=b)
    want = ot.sliced_wasserstein_distance(
        X, Y, None if a is None else a / a.sum(), None if b is None else b / b.sum(), n_projections=30, p=p, seed=7
    )
    np.testing.assert_allclose(got, want, **TIGHT)
    theta = K.projections(4, 30, 7)
    np.testing.assert_allclose(got, fallback.sliced_wasserstein(X, Y, theta, float(p), a, b), **TIGHT)
    if native is not None:
        np.testing.assert_allclose(native.sliced_wasserstein(X, Y, theta, float(p), a, b), got, **TIGHT)


@needs_native
def test_sliced_wasserstein_parallel_size_native_equals_fallback():
    # rows * d * L >= 2**23: the threaded projection; 2001 / 700 rows and 67 directions leave ragged tiles
    rng = np.random.default_rng(11)
    X, Y = rng.normal(size=(2001, 63)), rng.exponential(size=(700, 63))
    theta = K.projections(63, 67, 3)
    w = rng.random(2001)
    for p, xw in ((2.0, None), (1.0, w)):
        want = fallback.sliced_wasserstein(X, Y, theta, p, xw)
        np.testing.assert_allclose(native.sliced_wasserstein(X, Y, theta, p, xw, None), want, **TIGHT)


def test_sliced_wasserstein_deterministic_and_torch_input():
    rng = np.random.default_rng(3)
    X, Y = rng.normal(size=(30, 3)), rng.normal(size=(20, 3))
    one = K.sliced_wasserstein(X, Y, 20, seed=5)
    assert one == K.sliced_wasserstein(torch.from_numpy(X), torch.from_numpy(Y), 20, seed=5)
    assert one != K.sliced_wasserstein(X, Y, 20, seed=6)
    assert K.sliced_wasserstein(X, X, 10, seed=0) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "exc", "msg"),
    [
        ({"X": np.zeros((3, 2)), "Y": np.zeros((3, 3))}, ValueError, "different feature dimensions"),
        ({"X": np.zeros(3), "Y": np.zeros((3, 1))}, ValueError, "X must be 2-D"),
        ({"X": np.full((2, 2), np.nan), "Y": np.zeros((3, 2))}, ValueError, "X contains 4 NaN"),
        ({"X": np.zeros((2, 2)), "Y": np.zeros((3, 2)), "n_projections": 0}, ValueError, "n_projections must be >= 1"),
        ({"X": np.zeros((2, 2)), "Y": np.zeros((3, 2)), "n_projections": 2.5}, TypeError, "n_projections must be"),
        ({"X": np.zeros((2, 2)), "Y": np.zeros((3, 2)), "seed": -1}, ValueError, "seed must be in"),
        ({"X": np.zeros((2, 2)), "Y": np.zeros((3, 2)), "seed": None}, TypeError, "seed must be an integer"),
        ({"X": np.zeros((2, 2)), "Y": np.zeros((3, 2)), "p": 0.5}, ValueError, "p must be"),
        ({"X": np.zeros((2, 2)), "Y": np.zeros((3, 2)), "x_weights": [1.0]}, ValueError, "x_weights has shape (1,)"),
        ({"X": np.zeros((2, 2)), "Y": np.zeros((3, 2)), "y_weights": [0, 0, 0]}, ValueError, "y_weights are all"),
    ],
)
def test_sliced_wasserstein_bad_input(kwargs, exc, msg):
    with pytest.raises(exc, match=None) as info:
        K.sliced_wasserstein(**kwargs)
    assert str(info.value).startswith("sliced_wasserstein: ") and msg in str(info.value)


# ---------------------------------------------------------------- weighted_aggregate
AGG_SHAPES = [(1, 1, 1), (1, 3, 15), (5, 8, 16), (12, 9, 1000), (10, 20, 4099), (3, 17, 33)]


@needs_native
@pytest.mark.parametrize(("k", "n", "P"), AGG_SHAPES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_weighted_aggregate_native_equals_fallback(k, n, P, dtype):
    # K covers register tiles of 1..5 rows and two-tile splits; N groups of 8 plus remainders; P ragged tails
    rng = np.random.default_rng(k * 1000 + n)
    X = rng.normal(size=(n, P)).astype(dtype)
    W = rng.random((k, n))
    acc = np.float64 if dtype == np.float64 else np.float32
    want = fallback.weighted_aggregate(W, X, acc)
    tol = {"rtol": 1e-12, "atol": 1e-12} if acc == np.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for bufs in (X, [x.copy() for x in X]):
        got = native.weighted_aggregate(W, bufs, acc)
        assert got.dtype == acc and got.shape == (k, P)
        np.testing.assert_allclose(got, want, **tol)


@needs_native
def test_weighted_aggregate_mixed_and_parallel():
    rng = np.random.default_rng(2)
    P = 300_001  # K * N * P above the OpenMP threshold (2**25), ragged last block
    X = rng.normal(size=(12, P))
    W = rng.random((10, 12))
    kinds = [np.float16, np.float32, np.float64]
    bufs = [X[j].astype(kinds[j % 3]) for j in range(12)]
    ref = W @ np.stack([b.astype(np.float64) for b in bufs])
    np.testing.assert_allclose(native.weighted_aggregate(W, bufs, np.float64), ref, rtol=1e-12, atol=1e-11)
    # float64 buffers summed in float32 (a direct call; the face would pick float64)
    np.testing.assert_allclose(native.weighted_aggregate(W, bufs, np.float32), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stacked_torch", [False, True])
def test_weighted_aggregate_bfloat16_torch(stacked_torch):
    rng = np.random.default_rng(4)
    X = rng.normal(size=(6, 3001)).astype(np.float32)
    W = rng.random((3, 6))
    tb = [torch.from_numpy(x).to(torch.bfloat16) for x in X]
    exact = np.stack([t.float().numpy() for t in tb]).astype(np.float64)  # bf16 -> f32 is exact
    bufs = tb if not stacked_torch else [*tb[:3], X[3], X[4].astype(np.float16), tb[5]]
    if stacked_torch:
        exact[3], exact[4] = X[3], X[4].astype(np.float16)
    got = K.weighted_aggregate(W, bufs)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, W @ exact, rtol=1e-5, atol=1e-5)
    # a non-contiguous bf16 view works too (copied once, bits unchanged)
    big = torch.from_numpy(np.repeat(X[:1], 2, axis=0).T.copy()).to(torch.bfloat16)[:, 0]
    np.testing.assert_allclose(K.weighted_aggregate([[2.0]], [big]), 2 * exact[:1], rtol=1e-6)


def test_weighted_aggregate_bfloat16_stacked_tensor():
    rng = np.random.default_rng(5)
    X = torch.from_numpy(rng.normal(size=(4, 777)).astype(np.float32)).to(torch.bfloat16)
    W = rng.random((2, 4))
    got = K.weighted_aggregate(W, X)
    np.testing.assert_allclose(got, W @ X.float().numpy().astype(np.float64), rtol=1e-5, atol=1e-5)


def test_weighted_aggregate_bfloat16_nonfinite_names_the_buffer():
    huge = torch.full((8,), 3e36).to(torch.bfloat16)  # finite in bf16, but its bits read as f16 would be Inf
    bad = np.ones(8, np.float32)
    bad[3] = np.nan
    with pytest.raises(ValueError, match=r"buffers\[1\] contains NaN/Inf"):
        K.weighted_aggregate([[1.0, 1.0]], [huge, bad])
    with pytest.raises(ValueError, match=r"buffers\[0\] contains NaN/Inf"):
        K.weighted_aggregate([[1.0]], [torch.tensor([1.0, float("inf")], dtype=torch.bfloat16)])


# ---------------------------------------------------------------- cosine similarities
@needs_native
@pytest.mark.parametrize(("N", "r", "c"), [(1, 1, 5), (9, 1, 70), (6, 10, 30), (13, 3, 5000), (40, 20, 300)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_rowwise_mean_cosine_native_equals_fallback(N, r, c, dtype):
    rng = np.random.default_rng(N * r)
    M = rng.normal(size=(N, r, c)).astype(dtype)
    M[0, 0] = 0.0  # a zero row
    if N > 2:
        M[2] = 0.0  # a client that never moved
        M[1, -1] = (1e-10 * M[1, -1]).astype(dtype)  # below eps
    want = fallback.rowwise_mean_cosine_matrix(M, 1e-8)
    for m in (M, list(M)):
        got = native.rowwise_mean_cosine_matrix(m, 1e-8)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        assert np.array_equal(got, got.T)
    if r == 1:
        np.testing.assert_allclose(native.cosine_similarity_matrix(M[:, 0, :], 1e-8), want, atol=1e-12)


@needs_native
@pytest.mark.parametrize(("N", "r", "c"), [(64, 32, 520), (65, 1, 20_003)])
def test_similarity_parallel_size(N, r, c):
    # N * N * r * c / 2 >= 2**25: threads over rows (r > 1) or over column chunks (r = 1)
    M = np.random.default_rng(r).normal(size=(N, r, c)).astype(np.float32)
    M[3] = 0.0
    np.testing.assert_allclose(
        native.rowwise_mean_cosine_matrix(M, 1e-8), fallback.rowwise_mean_cosine_matrix(M, 1e-8), rtol=1e-10, atol=1e-12
    )


@needs_native
def test_wasserstein_1d_parallel_size():
    rng = np.random.default_rng(12)  # B * (n + m) >= 2**16
    u, v, uw = rng.normal(size=(160, 250)), rng.normal(size=(160, 230)), rng.random((160, 250))
    want = fallback.wasserstein_1d(u, v, 2.0, uw)
    np.testing.assert_allclose(native.wasserstein_1d(u, v, 2.0, uw, None), want, **TIGHT)


@needs_native
def test_similarity_mixed_dtypes():
    rng = np.random.default_rng(8)
    A = rng.normal(size=(5, 300))
    items = [A[0].astype(np.float16), A[1].astype(np.float32), A[2], A[3].astype(np.float32), A[4]]
    want = fallback.cosine_similarity_matrix([a.astype(np.float64) for a in items], 1e-8)
    np.testing.assert_allclose(native.cosine_similarity_matrix(items, 1e-8), want, atol=1e-12)


# ---------------------------------------------------------------- the native module's own checks
def _ok_u():
    return np.zeros((2, 3))


NATIVE_BAD = [
    (lambda: native.wasserstein_1d([[1.0]], [[1.0]], 1.0), TypeError, "u must be a numpy.ndarray"),
    (lambda: native.wasserstein_1d(np.zeros((2, 3), np.float32), _ok_u(), 1.0), TypeError, "u has dtype float32"),
    (lambda: native.wasserstein_1d(np.zeros(3), np.zeros(3), 1.0), ValueError, "u must be 2-D"),
    (lambda: native.wasserstein_1d(np.zeros((2, 6))[:, ::2], _ok_u(), 1.0), ValueError, "C-contiguous"),
    (lambda: native.wasserstein_1d(np.full((2, 3), np.nan), _ok_u(), 1.0), ValueError, "u contains NaN"),
    (lambda: native.wasserstein_1d(_ok_u(), np.zeros((3, 3)), 1.0), ValueError, "batch sizes differ"),
    (lambda: native.wasserstein_1d(_ok_u(), np.zeros((2, 0)), 1.0), ValueError, "v is empty"),
    (lambda: native.wasserstein_1d(_ok_u(), _ok_u(), 0.5), ValueError, "p must be"),
    (lambda: native.wasserstein_1d(_ok_u(), _ok_u(), 1.0, np.zeros((2, 2))), ValueError, "u_weights has shape"),
    (lambda: native.wasserstein_1d(_ok_u(), _ok_u(), 1.0, -np.ones((2, 3))), ValueError, "negative"),
    (lambda: native.wasserstein_1d(_ok_u(), _ok_u(), 1.0, None, np.zeros((2, 3))), ValueError, "all zero"),
    (lambda: native.wasserstein_pairwise(np.array([[1.0, np.inf]]), 1.0), ValueError, "sketches contains NaN/Inf"),
    (lambda: native.wasserstein_pairwise(np.zeros((2, 2), np.int64), 1.0), TypeError, "sketches has dtype int64"),
    (lambda: native.sliced_wasserstein(_ok_u(), np.zeros((2, 4)), _ok_u(), 2.0), ValueError, "dimensions differ"),
    (lambda: native.sliced_wasserstein(_ok_u(), _ok_u(), _ok_u(), 2.0, np.ones(3)), ValueError, "x_weights"),
    (lambda: native.weighted_aggregate(np.ones((1, 2)), [np.zeros(3)], np.float32), ValueError, "expected [K, 1]"),
    (lambda: native.weighted_aggregate(-np.ones((1, 1)), [np.zeros(3)], np.float32), ValueError, "negative"),
    (
        lambda: native.weighted_aggregate(np.ones((1, 2)), [np.zeros(3), np.zeros(4)], np.float32),
        ValueError,
        "buffers[1] has 4 elements",
    ),
    (
        lambda: native.weighted_aggregate(np.ones((1, 1)), [np.zeros(3, np.int32)], np.float32),
        TypeError,
        "buffers[0] has dtype int32",
    ),
    (lambda: native.weighted_aggregate(np.ones((1, 1)), [np.zeros(6)[::2]], np.float32), ValueError, "C-contiguous"),
    (lambda: native.weighted_aggregate(np.ones((1, 1)), "abc", np.float32), TypeError, "buffers must be"),
    (lambda: native.weighted_aggregate(np.ones((1, 1)), [], np.float32), ValueError, "empty sequence"),
    (lambda: native.weighted_aggregate(np.ones((1, 1)), [np.zeros(3)], np.int32), TypeError, "dtype is int32"),
    (
        lambda: native.weighted_aggregate(np.ones((1, 1)), [np.zeros(3, np.float32)], np.float32, [True]),
        TypeError,
        "flagged bfloat16",
    ),
    (
        lambda: native.weighted_aggregate(np.ones((1, 1)), [np.zeros(3, np.float16)], np.float32, [True, False]),
        ValueError,
        "bf16 has 2 flags",
    ),
    (lambda: native.cosine_similarity_matrix(np.zeros((2, 2, 2)), 1e-8), ValueError, "A must be 2-D"),
    (lambda: native.cosine_similarity_matrix([np.zeros(2), np.zeros(3)], 1e-8), ValueError, "A[1] has shape"),
    (lambda: native.cosine_similarity_matrix(np.array([[np.nan, 1.0]]), 1e-8), ValueError, "contains NaN"),
    (lambda: native.cosine_similarity_matrix(np.ones((2, 2)), 0.0), ValueError, "eps must be"),
    (lambda: native.rowwise_mean_cosine_matrix(np.zeros((2, 2)), 1e-8), ValueError, "mats must be 3-D"),
    (lambda: native.rowwise_mean_cosine_matrix(np.zeros((2, 2, 2), complex), 1e-8), TypeError, "complex128"),
]


@needs_native
@pytest.mark.parametrize(("call", "exc", "msg"), NATIVE_BAD)
def test_native_argument_checks(call, exc, msg):
    with pytest.raises(exc) as info:
        call()
    assert msg in str(info.value)


@needs_native
def test_native_build_info():
    info = native.build_info
    assert set(info) >= {"openmp", "isa", "cuda", "compiler"}
    assert native.max_threads() >= 1


# ---------------------------------------------------------------- backend switch
def test_fedcmd_native_0_uses_numpy_everywhere():
    env = {k: v for k, v in os.environ.items() if k != "FEDCMD_NATIVE"}
    env["FEDCMD_NATIVE"] = "0"
    code = (
        "import numpy as np, torch; from fedcmd_core import kernels as k; print(k.backend());"
        "print(k.sliced_wasserstein(np.eye(3), np.eye(3) * 2, 5, seed=1) > 0);"
        "print(k.weighted_aggregate([[1.0]], [torch.ones(3, dtype=torch.bfloat16)]).dtype)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["numpy", "True", "float32"]


# ---------------------------------------------------------------- optional CUDA build
def _cuda_devices() -> int:
    if native is None or not native.build_info.get("cuda"):
        return 0
    return int(native.cuda_device_count())


@pytest.mark.skipif(_cuda_devices() == 0, reason="native module built without CUDA, or no GPU")
def test_cuda_kernels_match_cpu():
    rng = np.random.default_rng(9)
    S = rng.normal(size=(33, 257))
    np.testing.assert_allclose(native.cuda_wasserstein_pairwise(S, 1.0), native.wasserstein_pairwise(S, 1.0), **TIGHT)
    W = rng.random((4, 7))
    bufs = [rng.normal(size=10_001).astype(np.float32) for _ in range(7)]
    np.testing.assert_allclose(
        native.cuda_weighted_aggregate(W, bufs), native.weighted_aggregate(W, bufs, np.float32), rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------- fedcmd bench kernels
def test_bench_kernels_quick_json():
    from typer.testing import CliRunner

    from cloud.cli.main import app

    result = CliRunner().invoke(app, ["bench", "kernels", "--quick", "--json", "--repeat", "1"])
    assert result.exit_code == 0, result.output
    start = result.stdout.index("{")
    rep = json.loads(result.stdout[start:])
    assert rep["backend"] == K.backend() and rep["copy_gbps"] > 0
    assert (rep["fma_gflops"] > 0) if native is not None else rep["fma_gflops"] is None
    f16 = next(t for t in rep["targets"] if t["name"] == "aggregate: f32 native / f16 native")
    assert ("multiply-add floor" in f16["note"]) == (native is not None)
    kernels_seen = {r["kernel"] for r in rep["rows"]}
    assert kernels_seen == {
        "wasserstein_pairwise",
        "wasserstein_1d",
        "sliced_wasserstein",
        "weighted_aggregate",
        "cosine_similarity_matrix",
        "rowwise_mean_cosine_matrix",
    }
    for r in rep["rows"]:
        assert r["fallback_ms"] > 0 and r["baseline_ms"] > 0
        if native is not None:
            assert r["native_ms"] > 0 and r["vs_fallback"] > 0 and r["vs_baseline"] > 0 and r["native_gbps"] > 0
    assert len(rep["targets"]) == 8 + (4 if native is not None else 0)  # + the aggregation's roofline shares
    assert all(np.isfinite(t["value"]) for t in rep["targets"] if t["value"] is not None)
    assert rep["read_gbps"] > 0
    for r in rep["rows"]:  # every aggregation row has its multiply-adds, hence a roofline share (the quick
        # sizes fit in cache, so against the memory read bandwidth they can exceed 100 %)
        if r["kernel"] == "weighted_aggregate" and native is not None:
            assert r["fmas"] > 0 and r["pct_of_roofline"] > 0 and r["roofline_ms"] > 0, r
    vote = rep["vote"]
    assert vote["train_ms"] > 0 and vote["vote_ms"] > 0 and np.isfinite(vote["overhead_pct"])
    assert vote["vote_every"] == 3  # measured as FedCMD runs it (SelectionParams.vote_every)
