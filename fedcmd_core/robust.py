"""Robust aggregation: what keeps a few hostile (or broken) devices from steering the shared model.

Two defences, each usable by every algorithm that averages:

* **Norm clipping** (on by default, applied by the coordinator before a strategy sees an update): an
  update's length is ``||trained - sent||`` over the float entries the device was sent, measured for the
  weights and for the BatchNorm running statistics separately (they move on different scales: one norm
  over both let a clipped update drive variances negative). Longer than ``clip_factor`` x the median
  length of the round (and of recent rounds) and that part is an outlier: it is scaled back along its own
  direction to the median length, so an update scaled by 1e6 counts like one honest update.
* **Coordinate-wise robust means** (``aggregation = "trimmed_mean" | "median"``): per entry, drop the
  ``trim_ratio`` largest and smallest values before the (data-size weighted) mean, or take the median.

Both are pure functions of arrays: no network, no files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedcmd_core.models import is_bn_statistic
from fedcmd_core.params import Arrays, float_keys, weighted_average

AGGREGATIONS = ("mean", "trimmed_mean", "median")


GROUPS = ("weights", "statistics")  # clipped separately: BN running statistics move on another scale


def _group(key: str) -> str:
    return "statistics" if is_bn_statistic(key) else "weights"


def _compared(trained: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> list[str]:
    # In name order: a decoded frame's arrays come in the order of safetensors' (Rust) hash map, different in
    # every process, and a float sum over the entries depends on its order (norms differed in the last bit).
    return [
        k
        for k in float_keys(trained, sorted(k for k in trained if k in sent))
        if np.issubdtype(np.asarray(sent[k]).dtype, np.floating)
    ]


def update_norms(trained: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Euclidean length of ``trained - sent`` per group (weights; BN statistics) over the float entries present
    in both; a group with no such entry is absent."""
    totals: dict[str, float] = {}
    for k in _compared(trained, sent):
        d = np.asarray(trained[k], dtype=np.float64) - np.asarray(sent[k], dtype=np.float64)
        g = _group(k)
        totals[g] = totals.get(g, 0.0) + float(np.dot(d.ravel(), d.ravel()))
    return {g: float(np.sqrt(t)) for g, t in totals.items()}


def update_norm(trained: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> float | None:
    """Euclidean length of ``trained - sent`` over all compared float entries (None: there are none)."""
    norms = update_norms(trained, sent)
    return float(np.sqrt(sum(n * n for n in norms.values()))) if norms else None


def clip_update(
    trained: Arrays, sent: Mapping[str, np.ndarray], norm: float, bound: float, group: str | None = None
) -> Arrays:
    """``trained`` moved back along ``trained - sent`` (the entries of ``group``, default all) so that that
    part of the update has length ``bound``. Moving back toward what was sent keeps every entry between the
    sent and the trained value, so a variance stays >= 0."""
    if norm <= bound or norm == 0.0:
        return trained
    scale = bound / norm
    out = dict(trained)
    for k in _compared(trained, sent):
        if group is not None and _group(k) != group:
            continue
        base = np.asarray(sent[k], dtype=np.float64)
        step = np.asarray(trained[k], dtype=np.float64) - base
        out[k] = (base + scale * step).astype(np.asarray(trained[k]).dtype)
    return out


def clip_bound(norms: Sequence[float], factor: float) -> tuple[float, float] | None:
    """(threshold, target): an update longer than ``factor`` x the median of ``norms`` is an outlier, and is
    scaled to the median length (None: no clipping, with factor 0 or nothing to compare).

    Scaling outliers to the median, not to the threshold, is what makes a boosted update count like one
    honest update (measured: clipped to 3 x the median, two boosted devices of ten still cost FedAvg 5
    points); honest updates stay below the threshold, so clean runs do not change."""
    if factor <= 0 or not norms:
        return None
    median = float(np.median(np.asarray(norms, dtype=np.float64)))
    return (factor * median, median) if median > 0 else None


def aggregate(
    states: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    keys: Sequence[str],
    method: str = "mean",
    trim_ratio: float = 0.1,
) -> Arrays:
    """Average ``keys`` over ``states``: the weighted mean, a weighted trimmed mean, or the median.

    Integer entries (counters such as ``num_batches_tracked``) take the median under the robust methods:
    one device's absurd counter must not become everyone's."""
    if method == "mean":
        return weighted_average(states, weights, keys)
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r} (known: {', '.join(AGGREGATIONS)})")
    if not states:
        raise ValueError("aggregate: no states to average")
    w = np.asarray(weights, dtype=np.float64)
    out: Arrays = {}
    for k in keys:
        ref = np.asarray(states[0][k])
        stack = np.stack([np.asarray(s[k], dtype=np.float64).ravel() for s in states])  # [n, size]
        if method == "median" or not np.issubdtype(ref.dtype, np.floating):
            value = np.median(stack, axis=0)
        else:
            value = _trimmed_mean(stack, w, trim_ratio)
        if not np.issubdtype(ref.dtype, np.floating):
            value = np.rint(value)
        out[k] = value.reshape(ref.shape).astype(ref.dtype)
    return out


def _trimmed_mean(stack: np.ndarray, weights: np.ndarray, trim_ratio: float) -> np.ndarray:
    """Per column: sort, drop ``floor(trim_ratio * n)`` values at each end, weighted mean of the rest."""
    n = stack.shape[0]
    cut = int(np.floor(trim_ratio * n))
    if n - 2 * cut < 1:
        cut = (n - 1) // 2
    order = np.argsort(stack, axis=0, kind="stable")
    kept = order[cut : n - cut]  # [n - 2 cut, size] row indices per column
    values = np.take_along_axis(stack, kept, axis=0)
    w = weights[kept]
    total = w.sum(axis=0)
    return np.where(total > 0, (values * w).sum(axis=0) / np.where(total > 0, total, 1.0), values.mean(axis=0))
