"""What the coordinator accepts from a device: an update is checked against the task that device was sent.

Every check raises :class:`Rejected` with a reason (a counter name) and a detail (one log line). Nothing a
device sends is trusted: array names, shapes and dtypes must be exactly the task's, every count is bounded,
every number finite, and the strategy's own ``info`` schema validates the extras.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

_METRIC_RE = re.compile(r"^(test|train)_(before|after)_(correct|loss|count)$")
MAX_METRICS = 32
MAX_INT_ENTRY = 2**40  # integer model entries are counters (num_batches_tracked): never negative, never absurd
MAX_SECONDS = 1e7


class Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def check_arrays(arrays: Mapping[str, np.ndarray], expected: list[str], initial: Mapping[str, np.ndarray]) -> None:
    """Exactly the ``expected`` names (an optional ``prefix::`` names a model entry), each with the model
    entry's shape and dtype; floats finite, integers within counter range."""
    want = set(expected)
    got = set(arrays)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        parts = ([f"missing {missing[:3]}"] if missing else []) + ([f"unexpected {extra[:3]}"] if extra else [])
        raise Rejected("bad_tensors", ", ".join(parts))
    bad_values: list[str] = []
    for key in expected:
        value = arrays[key]
        ref = initial.get(key.rsplit("::", 1)[-1])
        if ref is None:
            raise Rejected("bad_tensors", f"unknown tensor {key!r}")
        same_shape = value.shape == ref.shape or (value.size == ref.size == 1)
        if not same_shape:
            raise Rejected("bad_tensors", f"{key}: shape {value.shape}, expected {ref.shape}")
        if value.dtype != ref.dtype:
            raise Rejected("bad_tensors", f"{key}: dtype {value.dtype}, expected {ref.dtype}")
        if np.issubdtype(value.dtype, np.floating):
            if not np.isfinite(value).all():
                bad_values.append(key)
            elif key.endswith("running_var") and value.size and float(value.min()) < 0:
                raise Rejected("bad_tensors", f"{key}: a negative variance")
        elif value.size and (int(value.min()) < 0 or int(value.max()) > MAX_INT_ENTRY):
            raise Rejected("bad_tensors", f"{key}: integer values outside [0, 2**40]")
    if bad_values:
        raise Rejected("non_finite", f"{bad_values[:3]}")


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Rejected("bad_metrics", f"{key} is {type(value).__name__}, not a number")
    number = float(value)
    if not math.isfinite(number):
        raise Rejected("bad_metrics", f"{key} is {number}")
    return number


def check_metrics(metrics: Any, max_count: int) -> dict[str, float]:
    """Evaluation counts as the paper's metric pools them: complete (correct, loss, count) triples with
    0 <= correct <= count <= max_count and a finite loss >= 0; plus ``fit_seconds``."""
    if not isinstance(metrics, dict):
        raise Rejected("bad_metrics", f"metrics is {type(metrics).__name__}, not an object")
    if len(metrics) > MAX_METRICS:
        raise Rejected("bad_metrics", f"{len(metrics)} entries (at most {MAX_METRICS})")
    out: dict[str, float] = {}
    prefixes: set[str] = set()
    for key, value in metrics.items():
        if key == "fit_seconds":
            seconds = _number(key, value)
            if not 0 <= seconds <= MAX_SECONDS:
                raise Rejected("bad_metrics", f"fit_seconds {seconds}")
            out[key] = seconds
            continue
        m = _METRIC_RE.match(key) if isinstance(key, str) else None
        if m is None:
            raise Rejected("bad_metrics", f"unknown metric {str(key)[:60]!r}")
        out[key] = _number(key, value)
        prefixes.add(f"{m.group(1)}_{m.group(2)}")
    for prefix in sorted(prefixes):
        try:
            correct, loss, count = (out[f"{prefix}_{part}"] for part in ("correct", "loss", "count"))
        except KeyError:
            raise Rejected("bad_metrics", f"{prefix}: correct, loss and count go together") from None
        if count != int(count) or not 0 <= count <= max_count:
            raise Rejected("bad_metrics", f"{prefix}_count {count} (at most {max_count})")
        if correct != int(correct) or not 0 <= correct <= count:
            raise Rejected("bad_metrics", f"{prefix}_correct {correct} of {count}")
        if loss < 0:
            raise Rejected("bad_metrics", f"{prefix}_loss {loss}")
    return out


def check_info(info: Any, schema: type[BaseModel]) -> dict[str, Any]:
    """The strategy's declared extras, validated (unknown keys, wrong types, oversized maps rejected)."""
    if not isinstance(info, dict):
        raise Rejected("bad_info", f"info is {type(info).__name__}, not an object")
    try:
        return schema.model_validate(info).model_dump(exclude_none=True)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])[:80] or "info"
        raise Rejected("bad_info", f"{where}: {err['msg']}") from None


def check_num_samples(value: Any, cap: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= cap:
        raise Rejected("bad_count", f"num_samples {value!r} outside [{minimum}, {cap}]")
    return value
