"""Kernels against independent oracles: scipy, POT, torch and plain NumPy matmul."""

from __future__ import annotations

import importlib
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


def pot_wp(u, v, p, uw=None, vw=None) -> float:
    """POT oracle: it wants weights summing to 1 and returns W_p^p."""
    uw = None if uw is None else np.asarray(uw, float) / np.sum(uw)
    vw = None if vw is None else np.asarray(vw, float) / np.sum(vw)
    return float(ot.wasserstein_1d(np.asarray(u, float), np.asarray(v, float), uw, vw, p=p)) ** (1 / p)


# ---------------------------------------------------------------- hypothesis strategies
# a small pool of integers mixed with reals makes ties and duplicated values common
_value = st.one_of(
    st.floats(-100, 100, allow_nan=False, allow_infinity=False),
    st.integers(-3, 3).map(float),
)
_samples = st.lists(_value, min_size=1, max_size=25)


@st.composite
def _weighted(draw, values):
    n = len(values)
    w = draw(
        st.lists(
            st.one_of(st.just(0.0), st.floats(1e-3, 10, allow_nan=False)),
            min_size=n,
            max_size=n,
        )
    )
    if not any(w):
        w[draw(st.integers(0, n - 1))] = 1.0
    return w


@st.composite
def _distribution(draw):
    u = draw(_samples)
    w = draw(st.one_of(st.none(), _weighted(u)))
    return u, w


HYP = settings(max_examples=50, deadline=None)


# ---------------------------------------------------------------- wasserstein_1d
EXPLICIT = [
    ([0.0, 1.0, 3.0], [5.0, 6.0, 8.0], None, None),
    ([0.0, 1.0], [0.0, 0.5, 1.0, 7.0], None, None),  # unequal sizes
    ([1.0, 1.0, 1.0, 2.0], [1.0, 2.0, 2.0], None, None),  # ties and duplicates
    ([0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0], None, None),
    ([3.0], [-2.0], None, None),  # single samples
    ([2.0, 2.0], [2.0], None, None),  # identical distributions
    ([0.0, 1.0, 3.0], [5.0, 6.0, 8.0], [1.0, 2.0, 0.5], [0.2, 0.0, 4.0]),  # a zero weight
    ([0.0, 10.0], [0.0, 10.0], [1.0, 0.0], [0.0, 1.0]),  # zero weights at the ends
    ([4.0, 1.0, 4.0, 1.0], [1.0, 4.0], [3.0, 1.0, 1.0, 3.0], None),  # unsorted, weighted duplicates
    ([0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [1 / 3] * 3, None),  # CDFs equal only up to rounding
]


@pytest.mark.parametrize(("u", "v", "uw", "vw"), EXPLICIT)
def test_wasserstein_1d_explicit_vs_scipy(u, v, uw, vw):
    got = K.wasserstein_1d(u, v, u_weights=uw, v_weights=vw)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, scipy.stats.wasserstein_distance(u, v, uw, vw), **TIGHT)


@pytest.mark.parametrize(("u", "v", "uw", "vw"), EXPLICIT)
@pytest.mark.parametrize("p", [1, 2, 3, 1.5])
def test_wasserstein_1d_explicit_vs_pot(u, v, uw, vw, p):
    np.testing.assert_allclose(K.wasserstein_1d(u, v, p, uw, vw), pot_wp(u, v, p, uw, vw), **TIGHT)


def test_wasserstein_1d_known_values():
    # a shift by c moves every quantile by c: W_p = |c| for every p
    x = np.array([0.3, -1.0, 2.5, 7.0])
    for p in (1, 2, 3.7):
        assert K.wasserstein_1d(x, x + 2.5, p) == pytest.approx(2.5, abs=1e-12)
    # point masses 0 and 1 with masses (3/4, 1/4) vs (1/4, 3/4): half the mass moves by 1
    assert K.wasserstein_1d([0, 1], [0, 1], 2, [3, 1], [1, 3]) == pytest.approx(0.5**0.5, abs=1e-12)


@HYP
@given(_distribution(), _distribution())
def test_wasserstein_1d_property_vs_scipy(a, b):
    (u, uw), (v, vw) = a, b
    want = scipy.stats.wasserstein_distance(u, v, uw, vw)
    np.testing.assert_allclose(K.wasserstein_1d(u, v, 1, uw, vw), want, **TIGHT)


@HYP
@given(_distribution(), _distribution(), st.sampled_from([1, 2, 3]))
def test_wasserstein_1d_property_vs_pot(a, b, p):
    (u, uw), (v, vw) = a, b
    # Compared as W_p^p, the quantity both compute before the root: near 0 the p-th root turns a 1e-16
    # rounding residue of POT's into 1e-8 (found: POT gave 1.05e-8 for two equal distributions, we gave 0).
    ours, pot = K.wasserstein_1d(u, v, p, uw, vw), pot_wp(u, v, p, uw, vw)
    np.testing.assert_allclose(np.power(ours, p), np.power(pot, p), **TIGHT)


@HYP
@given(_distribution(), _distribution())
def test_wasserstein_1d_symmetric_and_monotone_in_p(a, b):
    (u, uw), (v, vw) = a, b
    w1 = K.wasserstein_1d(u, v, 1, uw, vw)
    assert w1 == pytest.approx(K.wasserstein_1d(v, u, 1, vw, uw), rel=1e-12, abs=1e-12)
    # W_p is non-decreasing in p (Jensen)
    assert w1 <= K.wasserstein_1d(u, v, 2, uw, vw) * (1 + 1e-12) + 1e-12


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("p", [1, 2, 3])
def test_wasserstein_1d_batched_equals_loop(weighted, p):
    rng = np.random.default_rng(p)
    u = rng.normal(size=(3, 4, 9))
    v = rng.normal(size=(4, 13)) * 2 + 0.5  # broadcasts against u's (3, 4) batch
    u[0, 0, :3] = u[0, 0, 3]  # ties inside one distribution
    uw = rng.random(u.shape) if weighted else None
    vw = rng.random(v.shape) if weighted else None
    if weighted:
        uw[1, 2, :5] = 0.0
    got = K.wasserstein_1d(u, v, p, uw, vw)
    assert got.shape == (3, 4) and got.dtype == np.float64
    for i in range(3):
        for j in range(4):
            want = K.wasserstein_1d(u[i, j], v[j], p, *_pair(uw, vw, i, j))
            assert got[i, j] == pytest.approx(want, rel=1e-12, abs=1e-14)
            assert got[i, j] == pytest.approx(pot_wp(u[i, j], v[j], p, *_pair(uw, vw, i, j)), rel=1e-9)


def _pair(uw, vw, i, j):
    return (None if uw is None else uw[i, j]), (None if vw is None else vw[j])


def test_wasserstein_1d_accepts_torch_ints_and_noncontiguous():
    rng = np.random.default_rng(1)
    u = rng.normal(size=(5, 40))
    v = rng.normal(size=(5, 30))
    want = K.wasserstein_1d(u[:, ::2], v, 2)
    assert K.wasserstein_1d(torch.from_numpy(u)[:, ::2], torch.from_numpy(v), 2) == pytest.approx(want)
    t32 = torch.tensor([0.5, 1.5, 2.0], requires_grad=True)
    assert K.wasserstein_1d(t32, np.array([1, 2, 3])) == pytest.approx(
        scipy.stats.wasserstein_distance([0.5, 1.5, 2.0], [1, 2, 3]), abs=1e-7
    )
    assert K.wasserstein_1d(np.float32([1, 2]), np.int64([1, 2])) == 0.0


# ---------------------------------------------------------------- wasserstein_pairwise
@pytest.fixture
def small_blocks(monkeypatch):
    """Force the tiled / blocked code paths (and their ragged last tiles) on small inputs."""
    monkeypatch.setattr(fallback, "BLOCK_BYTES", 8 * 64 * 9)
    monkeypatch.setattr(fallback, "AGG_BLOCK_BYTES", 4 * 5 * 37)


@pytest.mark.parametrize("blocks", ["default", "small"])
def test_wasserstein_pairwise_vs_scipy_and_pot(blocks, request):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    rng = np.random.default_rng(2)
    S = rng.normal(size=(11, 64)) * rng.uniform(0.5, 3, size=(11, 1))
    S[4] = S[2][::-1]  # same distribution as row 2: distance 0
    S[7, :10] = 0.0  # duplicated values
    D1 = K.wasserstein_pairwise(S)
    D2 = K.wasserstein_pairwise(S, p=2)
    for D in (D1, D2):
        assert D.shape == (11, 11) and D.dtype == np.float64
        assert np.array_equal(D, D.T)
        assert np.all(np.diag(D) == 0.0)
    for i in range(11):
        for j in range(11):
            np.testing.assert_allclose(D1[i, j], scipy.stats.wasserstein_distance(S[i], S[j]), **TIGHT)
            np.testing.assert_allclose(D2[i, j], pot_wp(S[i], S[j], 2), **TIGHT)
    assert D1[2, 4] == pytest.approx(0.0, abs=1e-15)


def test_wasserstein_pairwise_matches_wasserstein_1d_any_p():
    rng = np.random.default_rng(3)
    S = rng.exponential(size=(6, 33))
    D = K.wasserstein_pairwise(torch.from_numpy(S.astype(np.float32)), p=3)
    S32 = S.astype(np.float32).astype(np.float64)
    want = K.wasserstein_1d(S32[:, None, :], S32[None, :, :], 3)
    np.testing.assert_allclose(D, want, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- weighted_aggregate
def _agg_case(dtype, K_=4, N=7, P=1001, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, P)).astype(dtype)
    W = rng.random((K_, N))
    W[0, N // 2] = 0.0  # zero weights are allowed
    return W, X


@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("form", ["sequence", "stacked"])
def test_weighted_aggregate_float64(form, blocks, request):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    W, X = _agg_case(np.float64)
    bufs = [x.copy() for x in X] if form == "sequence" else X
    got = K.weighted_aggregate(W, bufs)
    assert got.dtype == np.float64 and got.shape == (4, 1001)
    np.testing.assert_allclose(got, W @ X, **TIGHT)


@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("form", ["sequence", "stacked"])
def test_weighted_aggregate_float32(form, blocks, request):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    W, X = _agg_case(np.float32)
    bufs = [x.copy() for x in X] if form == "sequence" else X
    got = K.weighted_aggregate(W, bufs)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, W @ X.astype(np.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("form", ["sequence", "stacked", "torch"])
def test_weighted_aggregate_float16(form, blocks, request):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    W, X = _agg_case(np.float16, P=3000)
    bufs = {"sequence": list(X), "stacked": X, "torch": [torch.from_numpy(x) for x in X]}[form]
    got = K.weighted_aggregate(W, bufs)
    assert got.dtype == np.float32
    # fp32 accumulation of the same (fp16-representable) values: far better than fp16 accumulation
    np.testing.assert_allclose(got, W @ X.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_weighted_aggregate_mixed_torch_and_strided():
    W, X = _agg_case(np.float32, K_=2, N=3, P=50)
    big = np.zeros((3, 100), np.float32)
    big[:, ::2] = X
    bufs = [
        torch.from_numpy(X[0]).to(torch.bfloat16),  # upcast to float32
        big[1, ::2],  # non-contiguous view
        X[2].astype(np.float64),  # any float64 buffer makes the result float64
    ]
    got = K.weighted_aggregate(torch.from_numpy(W), bufs)
    assert got.dtype == np.float64
    ref = np.stack([bufs[0].float().numpy().astype(np.float64), X[1], X[2]])
    np.testing.assert_allclose(got, W @ ref, rtol=1e-6)


def test_weighted_aggregate_does_not_normalise():
    bufs = [np.ones(3, np.float32), 2 * np.ones(3, np.float32)]
    np.testing.assert_array_equal(K.weighted_aggregate([[2.0, 3.0]], bufs), [[8.0, 8.0, 8.0]])


# ---------------------------------------------------------------- cosine similarities
def _torch_cos_matrix(A: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(A)
    return torch.nn.functional.cosine_similarity(t[:, None, :], t[None, :, :], dim=-1).numpy()


@pytest.mark.parametrize("blocks", ["default", "small"])
def test_cosine_similarity_matrix_vs_torch(blocks, request):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    rng = np.random.default_rng(4)
    A = rng.normal(size=(9, 70))
    A[5] = -2 * A[1]  # exactly opposite
    A[6] = 0.0  # zero row
    A[7] = 1e-10 * A[0]  # norm below eps: torch damps it, and so do we (off the diagonal)
    got = K.cosine_similarity_matrix(A)
    want = _torch_cos_matrix(A)
    off = ~np.eye(9, dtype=bool)
    np.testing.assert_allclose(got[off], want[off], atol=1e-6)
    np.testing.assert_array_equal(np.diag(got), [1, 1, 1, 1, 1, 1, 0, 1, 1])  # documented convention
    assert np.all(got[6, off[6]] == 0) and np.all(got[off[:, 6], 6] == 0)
    assert got[1, 5] == pytest.approx(-1.0)
    assert np.array_equal(got, got.T)
    # float32 torch as the reference, torch input, and the sequence form
    A32 = A.astype(np.float32)
    got32 = K.cosine_similarity_matrix(torch.from_numpy(A32))
    np.testing.assert_allclose(got32[off], _torch_cos_matrix(A32)[off], atol=1e-6)
    np.testing.assert_array_equal(K.cosine_similarity_matrix(list(A32)), got32)


def _torch_rowwise_loop(mats: list[np.ndarray]) -> np.ndarray:
    ts = [torch.from_numpy(m) for m in mats]
    n = len(ts)
    return np.array([[torch.cosine_similarity(ts[i], ts[j], dim=-1).mean().item() for j in range(n)] for i in range(n)])


@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rowwise_mean_cosine_matrix_vs_torch_loop(dtype, blocks, request):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    rng = np.random.default_rng(5)
    M = rng.normal(size=(6, 10, 30)).astype(dtype)
    M[2, 3] = 0.0  # one zero row in client 2's update
    M[4] = 0.0  # client 4 never moved
    got = K.rowwise_mean_cosine_matrix(M)
    want = _torch_rowwise_loop(list(M))
    np.testing.assert_allclose(got, want, atol=1e-6)  # includes the diagonal: 0.9 for client 2, 0 for 4
    assert got[2, 2] == 0.9 and got[4, 4] == 0.0 and got[0, 0] == 1.0
    np.testing.assert_array_equal(K.rowwise_mean_cosine_matrix(list(M)), got)
    np.testing.assert_array_equal(K.rowwise_mean_cosine_matrix([torch.from_numpy(m) for m in M]), got)


# ---------------------------------------------------------------- bad input
_B = [np.zeros(4, np.float32)] * 3
BAD = [
    # wasserstein_1d
    (lambda: K.wasserstein_1d([1.0], [1.0], p=0.5), ValueError, "p must be"),
    (lambda: K.wasserstein_1d([1.0], [1.0], p=float("nan")), ValueError, "p must be"),
    (lambda: K.wasserstein_1d([1.0], [1.0], p="2"), TypeError, "p must be"),
    (lambda: K.wasserstein_1d([], [1.0]), ValueError, "u is empty"),
    (lambda: K.wasserstein_1d([1.0], np.zeros((2, 0))), ValueError, "v is empty"),
    (lambda: K.wasserstein_1d(1.0, [1.0]), ValueError, "u must have at least 1"),
    (lambda: K.wasserstein_1d([1.0, np.nan], [1.0]), ValueError, "u contains 1 NaN/Inf"),
    (lambda: K.wasserstein_1d([1.0], [np.inf]), ValueError, "v contains"),
    (lambda: K.wasserstein_1d(np.array([1 + 1j]), [1.0]), TypeError, "u has dtype complex128"),
    (lambda: K.wasserstein_1d(["a"], [1.0]), TypeError, "u has dtype"),
    (lambda: K.wasserstein_1d([1.0], np.array([None], dtype=object)), TypeError, "v has dtype object"),
    (lambda: K.wasserstein_1d([True], [1.0]), TypeError, "u has dtype bool"),
    (lambda: K.wasserstein_1d(np.zeros((2, 3)), np.zeros((3, 3))), ValueError, "(2, 3) and v (3, 3)"),
    (lambda: K.wasserstein_1d([1.0, 2.0], [1.0], u_weights=[1.0]), ValueError, "u_weights has shape (1,)"),
    (lambda: K.wasserstein_1d([1.0, 2.0], [1.0], u_weights=[1.0, -1.0]), ValueError, "u_weights has neg"),
    (lambda: K.wasserstein_1d([1.0], [1.0], v_weights=[0.0]), ValueError, "v_weights are all zero"),
    (
        lambda: K.wasserstein_1d(np.ones((2, 2)), [1.0], u_weights=[[1.0, 1.0], [0.0, 0.0]]),
        ValueError,
        "u_weights are all zero at batch index (1,)",
    ),
    (lambda: K.wasserstein_1d([1.0], [1.0], v_weights=[np.nan]), ValueError, "v_weights contains"),
    (lambda: K.wasserstein_1d([1.0], [1.0], v_weights=["x"]), TypeError, "v_weights has dtype"),
    # wasserstein_pairwise
    (lambda: K.wasserstein_pairwise(np.zeros(4)), ValueError, "sketches must be 2-D"),
    (lambda: K.wasserstein_pairwise(np.zeros((0, 4))), ValueError, "sketches is empty"),
    (lambda: K.wasserstein_pairwise(np.full((2, 2), np.nan)), ValueError, "sketches contains 4 NaN"),
    (lambda: K.wasserstein_pairwise(np.zeros((2, 2)), p=0), ValueError, "wasserstein_pairwise: p must"),
    (lambda: K.wasserstein_pairwise(np.zeros((2, 2), complex)), TypeError, "sketches has dtype"),
    # weighted_aggregate
    (
        lambda: K.weighted_aggregate(np.ones((1, 5)), [np.zeros(1000)] * 3 + [np.zeros(999), np.zeros(1000)]),
        ValueError,
        "weighted_aggregate: buffers[3] has 999 elements, expected 1000 (like buffers[0])",
    ),
    (
        lambda: K.weighted_aggregate(np.ones((2, 2)), _B),
        ValueError,
        "weights has shape (2, 2), expected [K, 3]",
    ),
    (lambda: K.weighted_aggregate(np.ones(3), _B), ValueError, "weights must be 2-D"),
    (lambda: K.weighted_aggregate(np.ones((0, 3)), _B), ValueError, "weights is empty"),
    (lambda: K.weighted_aggregate([[1.0, -1.0, 1.0]], _B), ValueError, "weights has negative"),
    (lambda: K.weighted_aggregate([[1.0, 1.0, 1.0], [0, 0, 0]], _B), ValueError, "weights row 1 is all zero"),
    (lambda: K.weighted_aggregate([[1.0, np.inf, 1.0]], _B), ValueError, "weights contains"),
    (lambda: K.weighted_aggregate([[1.0, 1.0, 1.0]], []), ValueError, "buffers is an empty sequence"),
    (lambda: K.weighted_aggregate([[1.0]], [np.zeros(0)]), ValueError, "buffers[0] is empty"),
    (lambda: K.weighted_aggregate([[1.0]], [np.zeros(3, np.int64)]), TypeError, "buffers[0] has dtype int64"),
    (lambda: K.weighted_aggregate([[1.0]], [np.zeros((3, 1))]), ValueError, "buffers[0] must be 1-D"),
    (lambda: K.weighted_aggregate([[1.0]], np.zeros(3)), ValueError, "buffers must be a 2-D [N, P]"),
    (lambda: K.weighted_aggregate([[1.0]], np.zeros((1, 3), bool)), TypeError, "buffers has dtype bool"),
    (
        lambda: K.weighted_aggregate([[1.0, 0.0]], [np.zeros(3), np.array([0, np.nan, 0])]),
        ValueError,
        "buffers[1] contains NaN/Inf",
    ),
    (
        lambda: K.weighted_aggregate([[1.0, 1.0]], np.full((2, 3), 3e38, np.float32)),
        ValueError,
        "overflowed float32",
    ),
    # similarities
    (lambda: K.cosine_similarity_matrix(np.zeros((2, 2, 2))), ValueError, "A must be 2-D"),
    (lambda: K.cosine_similarity_matrix([np.zeros(3), np.zeros(4)]), ValueError, "A[1] has shape (4,)"),
    (lambda: K.cosine_similarity_matrix(np.zeros((2, 0))), ValueError, "A is empty"),
    (lambda: K.cosine_similarity_matrix(np.full((2, 2), np.nan)), ValueError, "A contains"),
    (lambda: K.cosine_similarity_matrix(np.zeros((2, 2)), eps=0), ValueError, "eps must be"),
    (lambda: K.rowwise_mean_cosine_matrix(np.zeros((2, 2))), ValueError, "mats must be 3-D"),
    (lambda: K.rowwise_mean_cosine_matrix([]), ValueError, "mats is an empty sequence"),
    (
        lambda: K.rowwise_mean_cosine_matrix([np.zeros((2, 3)), np.zeros((3, 2))]),
        ValueError,
        "mats[1] has shape (3, 2), expected (2, 3)",
    ),
    (lambda: K.rowwise_mean_cosine_matrix(np.zeros((2, 2, 2), complex)), TypeError, "mats has dtype"),
]


@pytest.mark.parametrize(("call", "exc", "msg"), BAD)
def test_bad_input(call, exc, msg):
    with pytest.raises(exc) as info:
        call()
    text = str(info.value)
    assert msg in text
    assert text.split(":")[0] in {
        "wasserstein_1d",
        "wasserstein_pairwise",
        "weighted_aggregate",
        "cosine_similarity_matrix",
        "rowwise_mean_cosine_matrix",
    }


# ---------------------------------------------------------------- backend selection
def _backend_in_subprocess(env_value: str | None, prelude: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FEDCMD_NATIVE"}
    if env_value is not None:
        env["FEDCMD_NATIVE"] = env_value
    code = prelude + "from fedcmd_core import kernels; print(kernels.backend())"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_backend_numpy_when_disabled():
    r = _backend_in_subprocess("0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "numpy"


def test_backend_without_native_module():
    # sys.modules[...] = None makes the import fail exactly as a missing module does
    hide = "import sys; sys.modules['fedcmd_core._native'] = None; "
    r = _backend_in_subprocess(None, hide)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "numpy"
    required = _backend_in_subprocess("1", hide)  # FEDCMD_NATIVE=1 insists on the native module
    assert required.returncode != 0 and "FEDCMD_NATIVE=1" in required.stderr


KERNELS = (
    "wasserstein_1d",
    "wasserstein_pairwise",
    "sliced_wasserstein",
    "weighted_aggregate",
    "cosine_similarity_matrix",
    "rowwise_mean_cosine_matrix",
)


def _native_importable() -> bool:
    try:
        importlib.import_module("fedcmd_core._native")
    except ImportError:
        return False
    return True


def test_backend_in_process():
    """The backend this process runs on is the one FEDCMD_NATIVE and the installed build call for, and every
    kernel dispatches to it: 0 -> NumPy; 1 -> native (a missing module fails the import of the kernels
    themselves); unset -> native exactly when the module imports. A native module missing a kernel fails."""
    mode = os.environ.get("FEDCMD_NATIVE", "").strip().lower()
    if mode in ("0", "false", "no", "off"):
        expected = "numpy"
    elif mode in ("1", "true", "yes", "on"):
        expected = "native"
        assert _native_importable()
    else:
        expected = "native" if _native_importable() else "numpy"
    assert K.backend() == (f"native-{K._native.variant}" if expected == "native" else "numpy")
    source = K._native if expected == "native" else fallback
    assert (K._native is None) == (expected == "numpy")
    for name in KERNELS:
        assert getattr(source, name, None) is not None, f"the {expected} backend has no {name}"
        assert getattr(K, f"_{name}") is getattr(source, name), name


def test_backend_native_when_required():
    r = _backend_in_subprocess("1")
    if _native_importable():
        assert r.returncode == 0, r.stderr
        variant = importlib.import_module("fedcmd_core._native").variant
        assert r.stdout.strip() == f"native-{variant}" and variant in ("avx512", "avx2", "portable")
    else:
        assert r.returncode != 0 and "FEDCMD_NATIVE=1 but fedcmd_core._native" in r.stderr


def test_face_agrees_with_numpy_fallback():
    """The fallback is the oracle for any native backend the face dispatches to."""
    rng = np.random.default_rng(6)
    u, v = rng.normal(size=(5, 20)), rng.normal(size=(5, 31))
    uw = rng.random((5, 20))
    np.testing.assert_allclose(K.wasserstein_1d(u, v, 2, uw), fallback.wasserstein_1d(u, v, 2.0, uw), **TIGHT)
    S = rng.normal(size=(9, 40))
    np.testing.assert_allclose(K.wasserstein_pairwise(S, 1.5), fallback.wasserstein_pairwise(S, 1.5), **TIGHT)
    W, X = _agg_case(np.float32)
    np.testing.assert_allclose(
        K.weighted_aggregate(W, list(X)), fallback.weighted_aggregate(W, X, np.float32), rtol=1e-5, atol=1e-6
    )
    M = rng.normal(size=(4, 3, 8))
    np.testing.assert_allclose(
        K.rowwise_mean_cosine_matrix(M), fallback.rowwise_mean_cosine_matrix(M, 1e-8), atol=1e-12
    )
