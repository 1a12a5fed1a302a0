"""Framing: one message = a safetensors blob whose metadata holds a versioned JSON header.

Never pickle: tensors travel in safetensors layout, everything else as JSON in the header.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

SCHEMA_VERSION = 1
MessageType = Literal["task", "update", "status", "presence"]


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
    num_samples: int = 0
    payload: dict[str, Any] = {}  # JSON-able strategy data: task config, metrics, votes


def encode(header: Header, arrays: dict[str, np.ndarray] | None = None) -> bytes:
    tensors = {k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}
    return st_save(tensors, metadata={"fedcmd": header.model_dump_json()})


def decode(frame: bytes) -> tuple[Header, dict[str, np.ndarray]]:
    if len(frame) < 8:
        raise DecodeError(f"frame of {len(frame)} bytes is too short")
    header_len = int.from_bytes(frame[:8], "little")
    if header_len <= 0 or 8 + header_len > len(frame):
        raise DecodeError("truncated frame: header length exceeds the frame")
    try:
        meta = json.loads(frame[8 : 8 + header_len]).get("__metadata__", {})
        raw = meta["fedcmd"]
    except (ValueError, AttributeError, KeyError) as e:
        raise DecodeError(f"no fedcmd header in frame ({e.__class__.__name__})") from None
    try:
        header = Header.model_validate_json(raw)
    except ValidationError as e:
        raise DecodeError(f"bad header: {e.errors()[0]['msg']}") from None
    if header.schema_version != SCHEMA_VERSION:
        raise DecodeError(f"unknown schema version {header.schema_version} (this build speaks {SCHEMA_VERSION})")
    try:
        arrays = st_load(frame)
    except (SafetensorError, ValueError) as e:
        raise DecodeError(f"bad tensor body: {e}") from None
    return header, arrays
