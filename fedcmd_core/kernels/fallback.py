"""NumPy implementations of the kernels: the fallback backend and the test oracle for native ones.

Correct first, fast second: vectorised NumPy, no Python loops over pairs or samples, temporaries
bounded by ``BLOCK_BYTES`` (loops run over blocks only). Inputs arrive validated by
``fedcmd_core.kernels`` (see its module docstring for the backend contract), so nothing is re-checked
here.
"""

from __future__ import annotations

import math

import numpy as np

# Upper bound for any one temporary; keeps the pairwise and similarity kernels' memory flat in N and n.
BLOCK_BYTES = 64 << 20
# Aggregation gathers one column block of every client into this much scratch: small enough to stay
# in L2/L3 while BLAS reads it, large enough that the per-block Python overhead is noise.
AGG_BLOCK_BYTES = 4 << 20


def _sorted_with_cdf(x: np.ndarray, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Sort [B, n] samples along the last axis; return them and their CDF at each sorted sample."""
    n = x.shape[-1]
    if w is None:
        xs = np.sort(x, axis=-1)
        # arange / n is exact at the ends (1/n ... 1.0), so equal-size CDFs tie exactly
        cdf = np.broadcast_to(np.arange(1, n + 1, dtype=np.float64) / n, x.shape)
        return xs, cdf
    order = np.argsort(x, axis=-1)
    xs = np.take_along_axis(x, order, axis=-1)
    cw = np.cumsum(np.take_along_axis(w, order, axis=-1), axis=-1)
    # divide by the cumsum's own last entry (not w.sum()) so the CDF ends at exactly 1.0
    return xs, cw / cw[..., -1:]


def wasserstein_1d(
    u: np.ndarray,
    v: np.ndarray,
    p: float,
    u_weights: np.ndarray | None = None,
    v_weights: np.ndarray | None = None,
) -> np.ndarray:
    """W_p between the rows of u [B, n] and v [B, m] (float64, optional weights of the same shapes,
    each row with positive total). Returns [B] float64: W_p itself, not its p-th power.

    Quantile-function form: W_p^p = integral over q in (0, 1] of |F_u^-1(q) - F_v^-1(q)|^p. Both
    quantile functions are step functions whose steps sit at the union of the two CDFs' values, so
    merging the CDFs gives the exact integral as a finite sum (the algorithm of POT's
    ``ot.wasserstein_1d``)."""
    n, m = u.shape[-1], v.shape[-1]
    us, ucdf = _sorted_with_cdf(u, u_weights)
    vs, vcdf = _sorted_with_cdf(v, v_weights)
    both = np.concatenate([np.broadcast_to(ucdf, us.shape), np.broadcast_to(vcdf, vs.shape)], axis=-1)
    # A stable merge puts u's entries before v's equal ones, so counting the entries of each side
    # that precede a position gives searchsorted(cdf, q, side="left") there, i.e. the index of
    # F^-1(q), for every position that starts a new q value (equal q values have zero width anyway).
    # This batches searchsorted, which NumPy cannot do along an axis.
    order = np.argsort(both, axis=-1, kind="stable")
    qs = np.take_along_axis(both, order, axis=-1)
    from_u = order < n
    from_v = ~from_u
    u_idx = np.cumsum(from_u, axis=-1) - from_u
    v_idx = np.cumsum(from_v, axis=-1) - from_v
    # a CDF ending a rounding error below the other's 1.0 would index one past the end: clamp
    np.minimum(u_idx, n - 1, out=u_idx)
    np.minimum(v_idx, m - 1, out=v_idx)
    diff = np.take_along_axis(us, u_idx, axis=-1)
    diff -= np.take_along_axis(vs, v_idx, axis=-1)
    np.abs(diff, out=diff)
    if p != 1:
        np.power(diff, p, out=diff)
    width = np.diff(qs, axis=-1, prepend=0.0)
    total = np.einsum("bi,bi->b", width, diff)
    return total if p == 1 else total ** (1.0 / p)


def wasserstein_pairwise(sketches: np.ndarray, p: float) -> np.ndarray:
    """[N, N] W_p between the rows of sketches [N, n] (float64), uniform weights.

    Equal sizes and uniform weights make the optimal coupling sort-to-sort, so sort each row once and
    W_p(i, j) = (mean_k |s_i[k] - s_j[k]|^p)^(1/p). Works on square tiles of the upper triangle so
    the [bi, bj, n] difference tensor stays under BLOCK_BYTES; the lower triangle is its mirror, which
    makes the result exactly symmetric with an exact zero diagonal."""
    s = np.sort(sketches, axis=1)
    N, n = s.shape
    tile = min(N, max(1, math.isqrt(BLOCK_BYTES // (8 * n))))
    out = np.zeros((N, N), dtype=np.float64)
    scratch = np.empty((tile, tile, n), dtype=np.float64)
    for i0 in range(0, N, tile):
        i1 = min(N, i0 + tile)
        for j0 in range(i0, N, tile):
            j1 = min(N, j0 + tile)
            d = scratch[: i1 - i0, : j1 - j0]
            np.subtract(s[i0:i1, None, :], s[None, j0:j1, :], out=d)
            np.abs(d, out=d)
            if p == 2:
                np.square(d, out=d)
            elif p != 1:
                np.power(d, p, out=d)
            blk = d.sum(axis=-1)
            blk /= n
            if p != 1:
                blk **= 1.0 / p
            out[i0:i1, j0:j1] = blk
            out[j0:j1, i0:i1] = blk.T
    return out


def _gather_cols(buffers: np.ndarray | list[np.ndarray], c0: int, c1: int, dst: np.ndarray) -> None:
    """Copy columns [c0, c1) of every client buffer into dst [N, c1 - c0], casting to dst's dtype."""
    if isinstance(buffers, np.ndarray):
        dst[...] = buffers[:, c0:c1]
    else:
        for j, b in enumerate(buffers):
            dst[j] = b[c0:c1]


def weighted_aggregate(
    weights: np.ndarray, buffers: np.ndarray | list[np.ndarray], dtype: np.dtype | type
) -> np.ndarray:
    """[K, P] = weights [K, N] @ buffers (N rows of P), accumulated in ``dtype`` (float32 or float64).

    buffers is one [N, P] array or a list of N 1-D arrays (float16/32/64, C-contiguous). The list is
    never stacked: each column block of all clients is gathered into a cache-sized scratch (casting
    float16 to the accumulation dtype on the way) and multiplied by BLAS, so memory traffic is one
    read of every buffer plus one write of the result."""
    dtype = np.dtype(dtype)
    w = weights.astype(dtype)
    if isinstance(buffers, np.ndarray) and buffers.dtype == dtype:
        return w @ buffers  # already stacked in the right dtype: plain BLAS is the bound
    K, N = w.shape
    P = buffers.shape[1] if isinstance(buffers, np.ndarray) else buffers[0].shape[0]
    bc = min(P, max(256, AGG_BLOCK_BYTES // (N * dtype.itemsize)))
    out = np.empty((K, P), dtype=dtype)
    scratch = np.empty((N, bc), dtype=dtype)
    for c0 in range(0, P, bc):
        c1 = min(P, c0 + bc)
        t = scratch[:, : c1 - c0]
        _gather_cols(buffers, c0, c1, t)
        np.matmul(w, t, out=out[:, c0:c1])  # strided out is fine: measured faster than copying a result
    return out


def _row_block(mats: np.ndarray | list[np.ndarray], k0: int, k1: int, c0: int, c1: int, dst: np.ndarray):
    """dst[kk, j, :] = mats[j][k0 + kk, c0:c1] as float64: rows grouped by row index k."""
    if isinstance(mats, np.ndarray):
        dst[...] = mats[:, k0:k1, c0:c1].transpose(1, 0, 2)
    else:
        for j, m in enumerate(mats):
            dst[:, j, :] = m[k0:k1, c0:c1]


def rowwise_mean_cosine_matrix(mats: np.ndarray | list[np.ndarray], eps: float) -> np.ndarray:
    """S[i, j] = mean over k of cos(mats[i][k], mats[j][k]) for mats [N, r, c] (or N arrays [r, c]).

    cos(x, y) = x.y / (max(|x|, eps) * max(|y|, eps)), torch.nn.functional.cosine_similarity's
    definition (each norm clamped separately, as torch does since 1.12), except cos(x, x) := 1 for
    x != 0 and 0 for x == 0. Computed in float64 as per-row Gram matrices accumulated over column
    blocks, so rows of any length and float16/32 inputs need no full float64 copy. Clipped to [-1, 1]."""
    N, r, c = (len(mats), *mats[0].shape) if isinstance(mats, list) else mats.shape
    budget = BLOCK_BYTES // 8
    bc = min(c, max(1, budget // N))
    bk = min(r, max(1, budget // (N * bc)), max(1, budget // (N * N)))
    scratch = np.empty((bk, N, bc), dtype=np.float64)
    total = np.zeros((N, N), dtype=np.float64)
    nonzero = np.zeros(N, dtype=np.float64)
    for k0 in range(0, r, bk):
        k1 = min(r, k0 + bk)
        gram = np.zeros((k1 - k0, N, N), dtype=np.float64)
        for c0 in range(0, c, bc):
            c1 = min(c, c0 + bc)
            t = scratch[: k1 - k0, :, : c1 - c0]
            _row_block(mats, k0, k1, c0, c1, t)
            gram += t @ t.transpose(0, 2, 1)
        sq = np.diagonal(gram, axis1=1, axis2=2)  # [bk, N] squared row norms
        den = np.maximum(np.sqrt(sq), eps)
        gram /= den[:, :, None]
        gram /= den[:, None, :]
        total += gram.sum(axis=0)
        nonzero += (sq > 0).sum(axis=0)
    # BLAS Gram blocks and the two divisions round differently above and below the diagonal
    total = (total + total.T) / (2 * r)
    np.fill_diagonal(total, nonzero / r)
    np.clip(total, -1.0, 1.0, out=total)
    return total


def cosine_similarity_matrix(A: np.ndarray | list[np.ndarray], eps: float) -> np.ndarray:
    """S[i, j] = cos(A[i], A[j]) for A [N, d] (or N arrays [d]): the one-row case of
    ``rowwise_mean_cosine_matrix``, same definition and zero-norm convention."""
    if isinstance(A, list):
        return rowwise_mean_cosine_matrix([a[None, :] for a in A], eps)
    return rowwise_mean_cosine_matrix(A[:, None, :], eps)


def sliced_wasserstein(
    X: np.ndarray,
    Y: np.ndarray,
    projections: np.ndarray,
    p: float,
    x_weights: np.ndarray | None = None,
    y_weights: np.ndarray | None = None,
) -> float:
    """Sliced W_p between the point clouds X [n, d] and Y [m, d] (float64, optional sample weights
    [n] / [m]) over the unit directions ``projections`` [L, d]: (mean_l W_p^p(X theta_l, Y theta_l))^(1/p),
    POT's ``ot.sliced_wasserstein_distance``. The directions are drawn by the caller (the face), so
    every backend slices along exactly the same lines."""
    xp = projections @ X.T  # [L, n]: one row of projected samples per direction
    yp = projections @ Y.T
    xw = None if x_weights is None else np.broadcast_to(x_weights, xp.shape)
    yw = None if y_weights is None else np.broadcast_to(y_weights, yp.shape)
    wp = wasserstein_1d(xp, yp, p, xw, yw)
    return float(np.mean(wp**p) ** (1.0 / p))
