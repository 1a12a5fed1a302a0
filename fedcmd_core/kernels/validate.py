"""Argument checking shared by every kernel backend.

The public face (``fedcmd_core.kernels``) runs these before dispatch, so a backend only ever sees
validated NumPy arrays: C-contiguous, of the dtype its docstring names, finite, non-empty, with
consistent shapes. Errors follow one convention: ``TypeError`` for a wrong kind of value (dtype,
container), ``ValueError`` for a wrong value (shape, NaN/Inf, negative weights, p < 1), and every
message starts with the function name and names the argument and the shapes involved.

No torch import: the edge inference path must not need torch, so tensors are recognised by duck typing.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

BUFFER_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _is_torch_tensor(x: object) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach") and hasattr(x, "numpy")


def to_numpy(x: Any) -> Any:
    """Return a NumPy view of a torch tensor (no copy for CPU tensors); anything else unchanged.

    bfloat16 has no NumPy dtype, so such tensors are upcast to float32 (a copy)."""
    if not _is_torch_tensor(x):
        return x
    t = x.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if str(t.dtype) == "torch.bfloat16":
        t = t.float()
    if t.is_conj():
        t = t.resolve_conj()
    return t.numpy()


def _as_array(fn: str, name: str, x: Any) -> np.ndarray:
    if x is None:
        raise TypeError(f"{fn}: {name} is None, expected an array")
    x = to_numpy(x)
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as e:  # ragged nested lists and the like
        raise TypeError(f"{fn}: {name} cannot be converted to an array ({e})") from None
    return arr


def _check_finite(fn: str, name: str, arr: np.ndarray) -> None:
    if not np.isfinite(arr).all():
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{fn}: {name} contains {bad} NaN/Inf value(s) (shape {arr.shape})")


def real_array(
    fn: str, name: str, x: Any, *, ndim: int | None = None, min_ndim: int = 1, keep_float: bool = False
) -> np.ndarray:
    """Real-valued input (floats of any width, or integers) as a finite C-contiguous float64 array.

    With ``keep_float`` float16/32/64 keep their dtype (kernels that upcast block by block need no
    full float64 copy of a large input); integers and other float widths still become float64."""
    arr = _as_array(fn, name, x)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{fn}: {name} has dtype {arr.dtype}, expected a real float or integer dtype")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got shape {arr.shape}")
    if arr.ndim < min_ndim:
        raise ValueError(f"{fn}: {name} must have at least {min_ndim} dimension(s), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{fn}: {name} is empty (shape {arr.shape})")
    dtype = arr.dtype if keep_float and arr.dtype in BUFFER_DTYPES else np.dtype(np.float64)
    arr = np.ascontiguousarray(arr, dtype=dtype)
    _check_finite(fn, name, arr)
    return arr


def check_p(fn: str, p: Any) -> float:
    """The Wasserstein order: a finite real number >= 1."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{fn}: p must be a real number, got {type(p).__name__}")
    p = float(p)
    if not math.isfinite(p) or p < 1:
        raise ValueError(f"{fn}: p must be a finite number >= 1, got {p}")
    return p


def check_eps(fn: str, eps: Any) -> float:
    """The norm clamp of the cosine kernels: a finite real number > 0."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{fn}: eps must be a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{fn}: eps must be a finite number > 0, got {eps}")
    return eps


def sample_weights(fn: str, name: str, w: Any, values: np.ndarray, values_name: str) -> np.ndarray | None:
    """Weights of an empirical distribution: same shape as the values, >= 0, each distribution with
    a positive total (checked per batch element, along the last axis)."""
    if w is None:
        return None
    arr = _as_array(fn, name, w)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{fn}: {name} has dtype {arr.dtype}, expected a real float or integer dtype")
    if arr.shape != values.shape:
        raise ValueError(
            f"{fn}: {name} has shape {arr.shape}, expected the shape of {values_name} {values.shape}"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    _check_finite(fn, name, arr)
    if (arr < 0).any():
        raise ValueError(f"{fn}: {name} has negative entries (min {arr.min()})")
    zero = ~(arr > 0).any(axis=-1)
    if zero.any():
        where = "" if arr.ndim == 1 else f" at batch index {tuple(int(i) for i in np.argwhere(zero)[0])}"
        raise ValueError(f"{fn}: {name} are all zero{where}; a distribution needs a positive total weight")
    return arr


def broadcast_batch(fn: str, names: tuple[str, str], a: np.ndarray, b: np.ndarray) -> tuple[int, ...]:
    """Common leading (batch) shape of two [..., n] / [..., m] arrays."""
    try:
        return np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    except ValueError:
        raise ValueError(
            f"{fn}: leading dimensions of {names[0]} {a.shape} and {names[1]} {b.shape} do not broadcast "
            "(samples are along the last axis)"
        ) from None


def weight_matrix(fn: str, name: str, w: Any, n_cols: int, cols_name: str) -> np.ndarray:
    """Aggregation weights [K, N]: finite, >= 0, no all-zero row (a target would get a zero body)."""
    arr = _as_array(fn, name, w)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{fn}: {name} has dtype {arr.dtype}, expected a real float or integer dtype")
    if arr.ndim != 2:
        raise ValueError(f"{fn}: {name} must be 2-D [K, N], got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{fn}: {name} is empty (shape {arr.shape})")
    if arr.shape[1] != n_cols:
        raise ValueError(f"{fn}: {name} has shape {arr.shape}, expected [K, {n_cols}] to match {cols_name}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    _check_finite(fn, name, arr)
    if (arr < 0).any():
        raise ValueError(f"{fn}: {name} has negative entries (min {arr.min()})")
    zero = ~(arr > 0).any(axis=1)
    if zero.any():
        raise ValueError(f"{fn}: {name} row {int(np.argmax(zero))} is all zero (shape {arr.shape})")
    return arr


def float_buffers(fn: str, name: str, buffers: Any) -> tuple[np.ndarray | list[np.ndarray], int, int]:
    """Client buffers: one [N, P] array, or a sequence of N 1-D arrays of equal length P.

    Only float16/32/64 are accepted (no silent int -> float conversion of model state). Returns the
    buffers (the array, or a list of C-contiguous 1-D arrays, never stacked), N and P. Finiteness is
    not scanned here: that would double the memory traffic of a memory-bound kernel; the face checks
    the (much smaller) result instead and names the offending buffer only when it is non-finite."""
    if isinstance(buffers, Sequence) and not isinstance(buffers, (str, bytes)):
        if len(buffers) == 0:
            raise ValueError(f"{fn}: {name} is an empty sequence")
        out: list[np.ndarray] = []
        size0 = -1
        for j, b in enumerate(buffers):
            bname = f"{name}[{j}]"
            arr = _as_array(fn, bname, b)
            if arr.dtype not in BUFFER_DTYPES:
                raise TypeError(f"{fn}: {bname} has dtype {arr.dtype}, expected float16, float32 or float64")
            if arr.ndim != 1:
                raise ValueError(f"{fn}: {bname} must be 1-D, got shape {arr.shape}")
            if j == 0:
                if arr.size == 0:
                    raise ValueError(f"{fn}: {bname} is empty (shape {arr.shape})")
                size0 = arr.size
            elif arr.size != size0:
                raise ValueError(f"{fn}: {bname} has {arr.size} elements, expected {size0} (like {name}[0])")
            out.append(np.ascontiguousarray(arr))
        return out, len(out), size0
    arr = _as_array(fn, name, buffers)
    if arr.dtype not in BUFFER_DTYPES:
        raise TypeError(f"{fn}: {name} has dtype {arr.dtype}, expected float16, float32 or float64")
    if arr.ndim != 2:
        raise ValueError(
            f"{fn}: {name} must be a 2-D [N, P] array or a sequence of 1-D arrays, got shape {arr.shape}"
        )
    if arr.size == 0:
        raise ValueError(f"{fn}: {name} is empty (shape {arr.shape})")
    return np.ascontiguousarray(arr), arr.shape[0], arr.shape[1]


def stacked_real(
    fn: str, name: str, x: Any, item_ndim: int
) -> tuple[np.ndarray | list[np.ndarray], tuple[int, ...]]:
    """An [N, *item] real array, or a sequence of N arrays of one shape ``item`` (item_ndim dims).

    Sequences are kept as a list (each item a finite C-contiguous array, checked one at a time) so
    large per-client matrices need not be stacked. Float16/32/64 keep their dtype (see
    ``real_array``). Returns the data and the full shape."""
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        if len(x) == 0:
            raise ValueError(f"{fn}: {name} is an empty sequence")
        items: list[np.ndarray] = []
        for j, item in enumerate(x):
            arr = real_array(fn, f"{name}[{j}]", item, ndim=item_ndim, keep_float=True)
            if j and arr.shape != items[0].shape:
                raise ValueError(
                    f"{fn}: {name}[{j}] has shape {arr.shape}, expected {items[0].shape} (like {name}[0])"
                )
            items.append(arr)
        return items, (len(items), *items[0].shape)
    arr = real_array(fn, name, x, ndim=item_ndim + 1, keep_float=True)
    return arr, arr.shape
