"""Can this device run what the coordinator describes? Checked before anything is allocated.

The RunSpec comes from the broker, so it is untrusted input: wrong types, an unknown model or algorithm,
inputs that are not this device's data, or a size that would exhaust the device (``num_classes = 1e9``
asks LeNet-5 for a 336 GB classifier). The model is first built on torch's ``meta`` device, which has
shapes but no storage, so its memory is estimated without allocating any of it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from pydantic import ValidationError

from edge_agent.profiles import DeviceProfile, MemoryEstimate, ProfileError, check_memory, estimate_for_model
from fedcmd_core.runspec import RunSpec

MB = 1 << 20


class Incompatible(ValueError):
    """The run cannot be served by this device; the text says why (one line, also sent in presence)."""


def parse_spec(raw: Any) -> RunSpec:
    try:
        return RunSpec.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "run"
        raise Incompatible(f"the coordinator's run description is invalid: {where}: {err['msg']}") from None


def default_memory_mb() -> int:
    """Without a profile the budget is this machine's physical memory."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MB)
    except (ValueError, OSError):
        return 16 * 1024


def check_run(
    raw: Any, input_shape: tuple[int, ...], data_bytes: int, profile: DeviceProfile | None
) -> tuple[RunSpec, MemoryEstimate]:
    """The parsed spec and its memory estimate, or :class:`Incompatible` with the reason."""
    spec = parse_spec(raw)
    if tuple(spec.input_shape) != tuple(input_shape):
        raise Incompatible(f"the coordinator's model expects inputs {tuple(spec.input_shape)}; "
                           f"this device's data has {tuple(input_shape)}")
    from fedcmd_core.strategies import algorithm, parse_params

    try:
        algorithm(spec.algo)
        parse_params(spec.algo, spec.hp)
    except ValueError as e:  # pydantic's ValidationError is one
        raise Incompatible(f"cannot run algorithm {spec.algo!r}: {str(e).splitlines()[0]}") from None
    runtime_mb = profile.runtime_overhead_mb if profile else 0
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated, whatever the spec asks for
            model = spec.build_model()
            estimate = estimate_for_model(
                model, tuple(spec.input_shape), spec.batch_size, data_bytes,
                momentum=spec.momentum > 0, runtime_mb=runtime_mb,
            )
    except Exception as e:  # untrusted shapes can fail anywhere in a model's constructor
        raise Incompatible(f"cannot build model {spec.model!r} for inputs {tuple(spec.input_shape)} and "
                           f"{spec.num_classes} classes: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                           ) from None
    what = f"{spec.model} with num_classes {spec.num_classes}, batch_size {spec.batch_size}"
    if profile is not None:
        try:
            check_memory(profile, estimate)
        except ProfileError as e:
            raise Incompatible(f"{what}: {e}") from None
    elif estimate.total_mb > default_memory_mb():
        raise Incompatible(f"{what} needs {estimate.describe()}, more than this machine's "
                           f"{default_memory_mb()} MB")
    return spec, estimate
