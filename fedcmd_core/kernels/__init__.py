"""Numeric kernels of fedcmd: 1-D Wasserstein distances, weighted aggregation, cosine similarities.

This module is the public face. It validates every argument (``validate.py``, shared by all
backends), then dispatches to a backend:

* ``native``: the compiled module ``fedcmd_core._native`` (C++/pybind11, built from ``csrc/``),
  used when it imports, unless the environment sets ``FEDCMD_NATIVE=0``; it holds several ISA variants
  of every kernel (portable; avx2 and avx512 on x86-64) and runs the best this CPU has (``FEDCMD_ISA``
  names one instead); ``backend()`` says which, e.g. ``native-avx2``;
* ``numpy``: ``fallback.py``, always present, and the test oracle for the native module.

Like POT's ``ot/backend.py``, the choice is made once, at import, by trying the import; a native module
that lacks one of the functions leaves that function on NumPy. ``FEDCMD_NATIVE=1`` makes a failed
native import an error instead of a silent fallback (for CI that must exercise the native build).

Inputs may be NumPy arrays, CPU torch tensors (viewed through ``.detach().cpu().numpy()``, no copy;
bfloat16 tensors are upcast to float32) or, where noted, sequences of them.

Backend contract (what ``_native`` must implement, same names): every array argument has been
validated, is C-contiguous and finite (client buffers excepted, see ``weighted_aggregate``).

* ``wasserstein_1d(u[B, n] f64, v[B, m] f64, p: float, u_weights[B, n] f64 | None,
  v_weights[B, m] f64 | None) -> [B] f64`` (W_p, not W_p^p)
* ``wasserstein_pairwise(sketches[N, n] f64, p: float) -> [N, N] f64``
* ``sliced_wasserstein(X[n, d] f64, Y[m, d] f64, projections[L, d] f64, p: float,
  x_weights[n] f64 | None, y_weights[m] f64 | None) -> float`` (the face draws the unit directions,
  see ``projections``, so every backend slices along the same lines)
* ``weighted_aggregate(weights[K, N] f64, buffers: [N, P] array | list of N [P] arrays
  (f16/f32/f64, possibly mixed), dtype: float32 | float64) -> [K, P] dtype``; the native module
  also takes ``bf16``: a list of N flags marking float16-typed buffers that hold bfloat16 bits
  (torch bfloat16 storage viewed without a copy; the NumPy path upcasts those to float32 instead)
* ``cosine_similarity_matrix(A: [N, d] array | list of N [d] arrays, eps: float) -> [N, N] f64``
* ``rowwise_mean_cosine_matrix(mats: [N, r, c] array | list of N [r, c] arrays, eps: float)
  -> [N, N] f64`` (the similarity inputs are float16/32/64)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from fedcmd_core.kernels import fallback, validate

__all__ = [
    "backend",
    "cosine_similarity_matrix",
    "projections",
    "rowwise_mean_cosine_matrix",
    "sliced_wasserstein",
    "wasserstein_1d",
    "wasserstein_pairwise",
    "weighted_aggregate",
]

NATIVE_ENV = "FEDCMD_NATIVE"
ISA_ENV = "FEDCMD_ISA"  # read by the native module at import: portable, avx2, avx512 or auto (the best the CPU runs)
# torch.nn.functional.cosine_similarity's default
COSINE_EPS = 1e-8

_native: ModuleType | None = None
native_import_error: str | None = None  # why the native backend is not in use, for diagnostics

_mode = os.environ.get(NATIVE_ENV, "").strip().lower()
if _mode in ("0", "false", "no", "off"):
    native_import_error = f"disabled by {NATIVE_ENV}={os.environ[NATIVE_ENV]}"
else:
    try:
        from fedcmd_core import _native  # type: ignore[attr-defined,no-redef]
    except ImportError as e:
        if _mode in ("1", "true", "yes", "on"):
            raise ImportError(f"{NATIVE_ENV}={os.environ[NATIVE_ENV]} but fedcmd_core._native: {e}") from e
        if os.environ.get(ISA_ENV, "").strip() not in ("", "auto"):  # a variant asked for by name: no silent NumPy
            raise
        _native = None
        native_import_error = f"{type(e).__name__}: {e}"


def _impl(name: str) -> Callable[..., Any]:
    fn = getattr(_native, name, None) if _native is not None else None
    return fn if fn is not None else getattr(fallback, name)


_wasserstein_1d = _impl("wasserstein_1d")
_wasserstein_pairwise = _impl("wasserstein_pairwise")
_sliced_wasserstein = _impl("sliced_wasserstein")
_weighted_aggregate = _impl("weighted_aggregate")
_native_bf16 = _weighted_aggregate is not fallback.weighted_aggregate  # only the native one reads bfloat16
_cosine_similarity_matrix = _impl("cosine_similarity_matrix")
_rowwise_mean_cosine_matrix = _impl("rowwise_mean_cosine_matrix")


def backend() -> str:
    """``"native-<variant>"`` when the compiled module is in use (the ISA variant it chose at import:
    ``avx512``, ``avx2`` or ``portable``; ``FEDCMD_ISA`` picks one), else ``"numpy"``."""
    if _native is None:
        return "numpy"
    return f"native-{getattr(_native, 'variant', 'portable')}"


def wasserstein_1d(
    u: Any, v: Any, p: float = 1, u_weights: Any = None, v_weights: Any = None
) -> np.ndarray | float:
    """p-Wasserstein distance W_p (p >= 1) between the empirical distributions of u and v.

    Samples lie along the LAST axis; leading dimensions are a batch and broadcast against each other
    (u [..., n], v [..., m], n and m may differ). Weights are optional, of the same shape as their
    values, non-negative, and not all zero for any distribution; they need not sum to 1.

    Returns W_p itself: a float for 1-D u and v, else a float64 array of the broadcast batch shape.
    Equals ``scipy.stats.wasserstein_distance`` for p=1, and ``ot.wasserstein_1d(...) ** (1/p)``:
    POT returns W_p^p and takes samples along the FIRST axis.
    """
    fn = "wasserstein_1d"
    p = validate.check_p(fn, p)
    u_arr = validate.real_array(fn, "u", u)
    v_arr = validate.real_array(fn, "v", v)
    uw = validate.sample_weights(fn, "u_weights", u_weights, u_arr, "u")
    vw = validate.sample_weights(fn, "v_weights", v_weights, v_arr, "v")
    lead = validate.broadcast_batch(fn, ("u", "v"), u_arr, v_arr)

    def rows(a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        return np.ascontiguousarray(np.broadcast_to(a, lead + a.shape[-1:])).reshape(-1, a.shape[-1])

    res = _wasserstein_1d(rows(u_arr), rows(v_arr), p, rows(uw), rows(vw))
    if not lead:
        return float(res[0])
    return np.asarray(res, dtype=np.float64).reshape(lead)


def wasserstein_pairwise(sketches: Any, p: float = 1) -> np.ndarray:
    """[N, N] float64 matrix of W_p between the rows of sketches [N, n] (equal sizes, uniform weights).

    Symmetric with a zero diagonal. Same value as ``wasserstein_1d`` on each pair of rows.
    """
    fn = "wasserstein_pairwise"
    p = validate.check_p(fn, p)
    s = validate.real_array(fn, "sketches", sketches, ndim=2)
    return _wasserstein_pairwise(s, p)


def projections(d: int, n_projections: int, seed: int) -> np.ndarray:
    """[n_projections, d] float64 unit directions for ``sliced_wasserstein``.

    Drawn exactly as POT's ``ot.sliced.get_random_projections(d, n_projections, seed)`` does (a
    ``np.random.RandomState(seed)`` normal [d, L] matrix, columns normalised), transposed so each
    direction is a contiguous row: our sliced distance and POT's slice along the same lines for the
    same seed, and the native and NumPy backends receive the same array."""
    t = np.random.RandomState(seed).randn(d, n_projections)
    t = t / np.sqrt(np.sum(t**2, 0, keepdims=True))
    return np.ascontiguousarray(t.T)


def sliced_wasserstein(
    X: Any,
    Y: Any,
    n_projections: int = 50,
    seed: int = 0,
    p: float = 2,
    x_weights: Any = None,
    y_weights: Any = None,
) -> float:
    """Sliced W_p between point clouds X [n, d] and Y [m, d]: (mean over n_projections random unit
    directions theta of W_p^p(X theta, Y theta))^(1/p). Optional non-negative sample weights [n] / [m].

    Deterministic in ``seed``; equals ``ot.sliced_wasserstein_distance(X, Y, a, b, n_projections,
    p, seed=seed)`` (same directions, see ``projections``). p defaults to 2 like POT."""
    fn = "sliced_wasserstein"
    p = validate.check_p(fn, p)
    for name, val in (("n_projections", n_projections), ("seed", seed)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
            raise TypeError(f"{fn}: {name} must be an integer, got {type(val).__name__}")
    if n_projections < 1:
        raise ValueError(f"{fn}: n_projections must be >= 1, got {n_projections}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"{fn}: seed must be in [0, 2**32), got {seed}")
    x = validate.real_array(fn, "X", X, ndim=2)
    y = validate.real_array(fn, "Y", Y, ndim=2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{fn}: X {x.shape} and Y {y.shape} have different feature dimensions")
    xw = validate.sample_weights(fn, "x_weights", x_weights, x[:, 0], "X's samples")
    yw = validate.sample_weights(fn, "y_weights", y_weights, y[:, 0], "Y's samples")
    theta = projections(x.shape[1], int(n_projections), int(seed))
    return float(_sliced_wasserstein(x, y, theta, p, xw, yw))


def _is_bf16_tensor(x: object) -> bool:
    return validate._is_torch_tensor(x) and str(getattr(x, "dtype", "")) == "torch.bfloat16"


def _bf16_as_half_bits(t: Any) -> np.ndarray:
    """The bfloat16 tensor's storage as a float16-typed NumPy view (same 2-byte bits, no copy for a
    CPU tensor): validation then sees a float16 buffer, and the native kernel is told the truth."""
    import torch  # only reached with a torch tensor in hand; the edge inference path never gets here

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.view(torch.float16).numpy()


def _buffer_is_finite(b: np.ndarray, bf16: bool) -> bool:
    if bf16:  # widen the bfloat16 bits to float32 (the top half of a float32 is a bfloat16)
        return bool(np.isfinite((b.view(np.uint16).astype(np.uint32) << 16).view(np.float32)).all())
    return bool(np.isfinite(b).all())


def weighted_aggregate(weights: Any, buffers: Sequence[Any] | Any) -> np.ndarray:
    """[K, P] array whose row k is sum_j weights[k, j] * buffers[j]; no normalisation (callers do it).

    weights: [K, N], finite, non-negative, no all-zero row. buffers: a sequence of N 1-D arrays of
    equal length P (never stacked: accumulated block by block) or one [N, P] array; dtype float16,
    float32 or float64 (torch bfloat16 is upcast to float32). Accumulates and returns float32, or
    float64 when any buffer is float64.

    Buffers are not pre-scanned for NaN/Inf (it would double the memory traffic); a non-finite
    input always makes the result non-finite (0 * NaN is NaN), which is checked, and then the
    offending buffer is located and named in the ValueError. A finite result that overflowed float32
    raises too: a non-finite aggregate must never reach a model.
    """
    fn = "weighted_aggregate"
    bf16: list[bool] | None = None
    if _native_bf16 and _is_bf16_tensor(buffers) and getattr(buffers, "ndim", 0) == 2:
        buffers = list(buffers)  # [N, P] bfloat16: N row views (no copy), read in place below
    if _native_bf16 and isinstance(buffers, Sequence) and any(_is_bf16_tensor(b) for b in buffers):
        # bfloat16 storage halves the bytes read; the NumPy path cannot read it, the native one can
        bf16 = [_is_bf16_tensor(b) for b in buffers]
        buffers = [_bf16_as_half_bits(b) if f else b for b, f in zip(buffers, bf16)]
    bufs, n, _ = validate.float_buffers(fn, "buffers", buffers)
    w = validate.weight_matrix(fn, "weights", weights, n, f"{n} buffers")
    dtypes = [bufs.dtype] if isinstance(bufs, np.ndarray) else [b.dtype for b in bufs]
    dtype = np.float64 if np.dtype(np.float64) in dtypes else np.float32
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite results are reported below
        out = _weighted_aggregate(w, bufs, dtype) if bf16 is None else _weighted_aggregate(w, bufs, dtype, bf16)
    if not np.isfinite(out).all():
        rows = bufs if isinstance(bufs, list) else list(bufs)
        for j, b in enumerate(rows):
            if not _buffer_is_finite(b, bool(bf16 and bf16[j])):
                raise ValueError(f"{fn}: buffers[{j}] contains NaN/Inf (shape {b.shape})")
        raise ValueError(
            f"{fn}: the result overflowed {np.dtype(dtype).name} (finite inputs, shape {out.shape})"
        )
    return out


def cosine_similarity_matrix(A: Any, *, eps: float = COSINE_EPS) -> np.ndarray:
    """[N, N] float64 cosine similarities between the rows of A [N, d] (or a sequence of N [d] arrays).

    Off the diagonal, torch's definition: x.y / (max(|x|, eps) * max(|y|, eps)) (torch 2.x clamps
    each norm separately; its docs' max(|x| * |y|, eps) is outdated), so a zero row has similarity 0
    with everything. The diagonal is defined as 1.0 for non-zero rows and 0.0 for zero rows (torch
    gives 1 up to rounding, and less than 1 only for rows with norm below eps). Clipped to [-1, 1].
    """
    fn = "cosine_similarity_matrix"
    a, _ = validate.stacked_real(fn, "A", A, item_ndim=1)
    return _cosine_similarity_matrix(a, validate.check_eps(fn, eps))


def rowwise_mean_cosine_matrix(mats: Any, *, eps: float = COSINE_EPS) -> np.ndarray:
    """[N, N] float64: S[i, j] = mean over rows k of cos(mats[i][k], mats[j][k]).

    mats: [N, r, c] or a sequence of N [r, c] arrays (e.g. per-client personal-layer updates). Equals
    ``torch.cosine_similarity(W_i, W_j, dim=-1).mean()`` (FedCMD, pFedSim), with the per-row
    convention of ``cosine_similarity_matrix``: the diagonal is the fraction of non-zero rows.
    """
    fn = "rowwise_mean_cosine_matrix"
    m, _ = validate.stacked_real(fn, "mats", mats, item_ndim=2)
    return _rowwise_mean_cosine_matrix(m, validate.check_eps(fn, eps))
