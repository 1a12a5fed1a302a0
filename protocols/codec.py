"""Framing: one message = a safetensors blob whose metadata holds a versioned JSON header.

Never pickle: tensors travel in safetensors layout, everything else as JSON in the header.
Optional lossy codecs shrink float tensors on the wire: ``fp16`` (half precision) and ``int8``
(symmetric per-tensor quantisation, ``<key>`` as int8 plus ``<key>::scale`` as a float32 scalar).
The full wire format is in ``protocols/README.md``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

SCHEMA_VERSION = 1
MessageType = Literal["task", "update", "status", "presence"]
Codec = Literal["none", "fp16", "int8"]
CODECS: tuple[str, ...] = get_args(Codec)
SCALE_SUFFIX = "::scale"  # reserved tensor-name suffix: the int8 codec's per-tensor scales
METADATA_KEY = "fedcmd"  # the safetensors ``__metadata__`` entry that holds the header JSON
_FP16_MAX = float(np.finfo(np.float16).max)
# Every float in the fedcmd header takes exactly this many characters: its shortest round-trip decimal
# (at most 24, e.g. -2.2250738585072014e-308) right-padded with spaces, which JSON allows after a value.
# A frame's length then depends on its structure, never on the values of its floats: the wall-clock
# ``fit_seconds`` an update carries (or a loss differing in its last bit) cannot change byte counts.
FLOAT_WIDTH = 24


class DecodeError(ValueError):
    """A frame that is not a valid fedcmd message (the reason is in the text)."""


class Header(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    type: MessageType
    fleet: str
    round: int = -1
    client: int = -1
    kind: str = ""  # task kind ("fit"/"evaluate")
    run: str = Field("", max_length=64)  # the coordinator's run id: a task's update echoes it
    num_samples: int = 0
    payload: dict[str, Any] = {}  # JSON-able strategy data: task config, metrics, votes
    codec: Codec = "none"  # how float tensors were packed; decode undoes it


def _quantise(arrays: dict[str, np.ndarray], codec: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if key.endswith(SCALE_SUFFIX):
            raise ValueError(f"tensor name {key!r} ends with the reserved suffix {SCALE_SUFFIX!r}")
        # np.require, not ascontiguousarray: the latter turns 0-d scalars into shape (1,).
        arr = np.require(value, requirements="C")
        is_float = arr.dtype in (np.float32, np.float64)
        if codec == "fp16" and is_float:
            # Finite values beyond float16 range would silently become inf; refuse instead.
            finite = arr[np.isfinite(arr)]
            if finite.size and float(np.abs(finite).max()) > _FP16_MAX:
                raise ValueError(f"tensor {key!r} has values beyond the float16 range; use codec 'none'")
            arr = arr.astype(np.float16)
        elif codec == "int8":
            if arr.dtype == np.int8:
                # Under int8 every int8 tensor is read as quantised: an original int8 tensor is ambiguous.
                raise ValueError(f"tensor {key!r} is int8: send it with codec 'none' or as a wider integer")
            if is_float:
                if not np.isfinite(arr).all():
                    raise ValueError(f"tensor {key!r} has non-finite values, which int8 cannot represent")
                peak = float(np.abs(arr).max()) if arr.size else 0.0
                scale = peak / 127.0 if peak > 0 else 1.0
                if scale > float(np.finfo(np.float32).max):
                    raise ValueError(f"tensor {key!r} has values beyond the float32 range")
                out[key + SCALE_SUFFIX] = np.array(scale, dtype=np.float32)
                # Divide by the float32-rounded scale the receiver will multiply by.
                arr = np.clip(np.rint(arr / np.float32(scale)), -127, 127).astype(np.int8)
        out[key] = arr
    return out


def _dequantise(arrays: dict[str, np.ndarray], codec: str) -> dict[str, np.ndarray]:
    scales = {k[: -len(SCALE_SUFFIX)]: v for k, v in arrays.items() if k.endswith(SCALE_SUFFIX)}
    if codec != "int8":
        if scales:
            raise DecodeError(f"scale entries {sorted(scales)[:3]} in a frame with codec {codec!r}")
        if codec == "fp16":
            return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in arrays.items()}
        return arrays
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if key.endswith(SCALE_SUFFIX):
            base = arrays.get(key[: -len(SCALE_SUFFIX)])
            if base is None or base.dtype != np.int8:
                raise DecodeError(f"scale {key!r} has no int8 tensor beside it")
            continue
        if value.dtype != np.int8:
            out[key] = value
            continue
        scale = scales.get(key)
        if scale is None:
            raise DecodeError(f"quantised tensor {key!r} has no {SCALE_SUFFIX} entry")
        if scale.dtype != np.float32 or scale.size != 1:
            raise DecodeError(f"scale of {key!r} must be one float32, got {scale.dtype} of shape {scale.shape}")
        s = float(scale.reshape(-1)[0])
        if not np.isfinite(s) or s < 0:
            raise DecodeError(f"scale of {key!r} is {s}: not a finite non-negative number")
        out[key] = value.astype(np.float32) * np.float32(s)
    return out


def _fixed_json(value: Any) -> str:
    """Compact JSON of plain JSON data (str keys), every float padded to :data:`FLOAT_WIDTH`."""
    if isinstance(value, float):  # a non-finite float is already null: header_json parses pydantic's JSON
        return repr(value).ljust(FLOAT_WIDTH) if math.isfinite(value) else "null"
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + _fixed_json(v) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_fixed_json(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def header_json(header: Header) -> str:
    """The fedcmd header as it travels: pydantic's compact JSON with every float fixed-width."""
    # The round trip through pydantic's JSON leaves only JSON data (str keys, non-finite floats as null).
    return _fixed_json(json.loads(header.model_dump_json()))


def encode(header: Header, arrays: dict[str, np.ndarray] | None = None, codec: Codec | None = None) -> bytes:
    """One frame: ``arrays`` in safetensors layout, ``header`` as JSON in its metadata.

    ``codec`` (default: ``header.codec``) packs float32/float64 tensors; the frame's header records it.
    Raises ``ValueError`` for an unknown codec, a reserved tensor name, or values the codec cannot carry.
    """
    codec = header.codec if codec is None else codec
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
    if codec != header.codec:
        header = header.model_copy(update={"codec": codec})
    tensors = _quantise(arrays or {}, codec)
    return st_save(tensors, metadata={METADATA_KEY: header_json(header)})


def decode(frame: bytes) -> tuple[Header, dict[str, np.ndarray]]:
    """Parse and check a frame; every malformed input raises :class:`DecodeError` with the reason.

    Quantised tensors come back as float32 and the ``::scale`` entries are removed."""
    if len(frame) < 8:
        raise DecodeError(f"frame of {len(frame)} bytes is too short")
    header_len = int.from_bytes(frame[:8], "little")
    if header_len <= 0 or 8 + header_len > len(frame):
        raise DecodeError("truncated frame: header length exceeds the frame")
    try:
        meta = json.loads(frame[8 : 8 + header_len]).get("__metadata__", {})
        raw = meta[METADATA_KEY]
    except (ValueError, AttributeError, KeyError, TypeError, RecursionError) as e:
        raise DecodeError(f"no fedcmd header in frame ({e.__class__.__name__})") from None
    if not isinstance(raw, str):
        raise DecodeError("the fedcmd header is not a JSON string")
    try:
        header = Header.model_validate_json(raw)
    except ValidationError as e:
        raise DecodeError(f"bad header: {e.errors()[0]['msg']}") from None
    if header.schema_version != SCHEMA_VERSION:
        raise DecodeError(f"unknown schema version {header.schema_version} (this build speaks {SCHEMA_VERSION})")
    try:
        # sorted: safetensors hands back a Rust HashMap's order, random per process, and a consumer that
        # iterates the arrays (FedFomo's peers, in its weighted mix) would round differently run to run
        arrays = dict(sorted(st_load(bytes(frame)).items()))
    except Exception as e:  # untrusted input: any failure of the safetensors parser means a bad frame
        raise DecodeError(f"bad tensor body: {e}") from None
    return header, _dequantise(arrays, header.codec)
