"""Model parameters as plain named NumPy arrays: what strategies store, aggregate and send."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedcmd_core import kernels

Arrays = dict[str, np.ndarray]


def model_arrays(model: nn.Module, keys: Iterable[str] | None = None) -> Arrays:
    """A detached NumPy copy of the model's state (all keys, or just ``keys``)."""
    state = model.state_dict()
    names = state.keys() if keys is None else keys
    return {k: state[k].detach().cpu().numpy().copy() for k in names}


def load_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy ``arrays`` into the matching entries of the model's state, in place (others untouched)."""
    if not arrays:
        return
    state = model.state_dict()
    with torch.no_grad():
        for key, value in arrays.items():
            target = state[key]
            value = np.asarray(value)
            if value.shape != tuple(target.shape):
                if value.size != target.numel():
                    raise ValueError(f"{key}: shape {value.shape} does not fit {tuple(target.shape)}")
                value = value.reshape(tuple(target.shape))  # 0-d scalars may travel as [1]
            target.copy_(torch.from_numpy(value).to(target.dtype))


def copy_arrays(arrays: Mapping[str, np.ndarray]) -> Arrays:
    return {k: np.array(v, copy=True) for k, v in arrays.items()}


def flatten(arrays: Mapping[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
    """Concatenate the float entries ``keys`` into one float32 vector (the aggregation buffer)."""
    if not keys:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(arrays[k], dtype=np.float32).ravel() for k in keys])


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray], keys: Sequence[str]) -> Arrays:
    """Split a vector made by :func:`flatten` back into arrays shaped (and typed) like ``like``."""
    out: Arrays = {}
    offset = 0
    for k in keys:
        ref = like[k]
        n = ref.size
        out[k] = vector[offset : offset + n].reshape(ref.shape).astype(ref.dtype, copy=False)
        offset += n
    return out


def float_keys(arrays: Mapping[str, np.ndarray], keys: Iterable[str]) -> list[str]:
    return [k for k in keys if np.issubdtype(arrays[k].dtype, np.floating)]


def weighted_average(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], keys: Sequence[str]
) -> Arrays:
    """Weighted mean of ``keys`` over ``states`` through the aggregation kernel.

    Float entries are averaged with ``weights`` (normalised here); integer entries such as
    ``num_batches_tracked`` take the maximum, which is what a counter means after a merge.
    """
    if not states:
        raise ValueError("weighted_average: no states to average")
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        raise ValueError(f"weighted_average: weights sum to {w.sum()}")
    fkeys = float_keys(states[0], keys)
    ikeys = [k for k in keys if k not in set(fkeys)]
    buffers = [flatten(s, fkeys) for s in states]
    averaged = kernels.weighted_aggregate((w / w.sum())[None, :], buffers)[0]
    out = unflatten(averaged, states[0], fkeys)
    for k in ikeys:
        out[k] = np.max(np.stack([np.asarray(s[k]) for s in states]), axis=0)
    return out
