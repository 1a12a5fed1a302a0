"""Topic scheme under ``fedcmd/<fleet>/`` (a device publishes only under its own client id).

::

    fedcmd/<fleet>/client/<id>/task       coordinator -> device   (QoS 1)
    fedcmd/<fleet>/client/<id>/update     device -> coordinator   (QoS 1)
    fedcmd/<fleet>/client/<id>/presence   device (and its last will), retained
    fedcmd/<fleet>/status                 coordinator, retained

``<id>`` is the integer client id as decimal text (no sign, no leading zeros).
"""

from __future__ import annotations

import json
import operator
import re
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PresenceState = Literal["online", "offline", "unhealthy", "incompatible"]

_FLEET_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_CLIENT_TOPIC_RE = re.compile(r"^fedcmd/([A-Za-z0-9_.-]{1,64})/client/(0|[1-9][0-9]{0,17})/(task|update|presence)$")


def check_fleet(fleet: str) -> str:
    """A fleet name is one topic level of ``[A-Za-z0-9_.-]`` (no ``/``, ``+``, ``#``, which would change
    what a subscription or an ACL pattern matches)."""
    if not _FLEET_RE.match(fleet):
        raise ValueError(f"invalid fleet name {fleet!r}: 1-64 characters of [A-Za-z0-9_.-]")
    return fleet


def _client(client: int) -> int:
    # operator.index accepts NumPy integers (sampled ids) but not floats or strings.
    try:
        value = operator.index(client)
    except TypeError:
        value = -1
    if isinstance(client, bool) or value < 0:
        raise ValueError(f"invalid client id {client!r}: a non-negative integer")
    return value


def task_topic(fleet: str, client: int) -> str:
    return f"fedcmd/{check_fleet(fleet)}/client/{_client(client)}/task"


def update_topic(fleet: str, client: int) -> str:
    return f"fedcmd/{check_fleet(fleet)}/client/{_client(client)}/update"


def updates_filter(fleet: str) -> str:
    return f"fedcmd/{check_fleet(fleet)}/client/+/update"


def presence_topic(fleet: str, client: int) -> str:
    """Retained ``{"state": "online"|"offline"}`` from the device; its last will sets offline."""
    return f"fedcmd/{check_fleet(fleet)}/client/{_client(client)}/presence"


def presence_filter(fleet: str) -> str:
    return f"fedcmd/{check_fleet(fleet)}/client/+/presence"


def status_topic(fleet: str) -> str:
    """Retained coordinator status (a JSON object, see protocols/README.md)."""
    return f"fedcmd/{check_fleet(fleet)}/status"


def parse_client_topic(topic: str) -> tuple[str, int, str]:
    """``fedcmd/<fleet>/client/<id>/<leaf>`` -> ``(fleet, id, leaf)``; ``ValueError`` for anything else.

    Receivers use it to check that a message's header names the client whose topic carried it."""
    m = _CLIENT_TOPIC_RE.match(topic)
    if not m:
        raise ValueError(f"not a fedcmd client topic: {topic[:200]!r}")
    return m.group(1), int(m.group(2)), m.group(3)


MAX_PRESENCE_BYTES = 4096
_PROFILE_RE = r"^[A-Za-z0-9_.-]{1,32}$"


class Presence(BaseModel):
    """A device's retained presence: a bounded schema (the coordinator copies parts of it into its status).

    ``online`` devices can be sampled; ``unhealthy`` (it cannot keep its state: disk full, ...) and
    ``incompatible`` (it cannot build the coordinator's run) say why in ``reason`` and are not sampled."""

    model_config = ConfigDict(extra="forbid", strict=True)

    state: PresenceState
    client: int = Field(ge=0, le=10**18)
    profile: str | None = Field(None, pattern=_PROFILE_RE)
    reason: str | None = Field(None, max_length=300)


def presence_payload(client: int, state: PresenceState, **info: Any) -> bytes:
    """The presence message body: compact JSON ``{"state": ..., "client": ..., <info>...}``."""
    if state not in get_args(PresenceState):
        raise ValueError(f"presence state must be one of {get_args(PresenceState)}, not {state!r}")
    if isinstance(info.get("reason"), str):
        info["reason"] = info["reason"][:300]
    doc = Presence(state=state, client=_client(client), **info)
    return doc.model_dump_json(exclude_none=True).encode()


def parse_presence(payload: bytes) -> dict[str, Any]:
    """Parse and check a presence body; ``ValueError`` (with the reason) for anything malformed."""
    if len(payload) > MAX_PRESENCE_BYTES:
        raise ValueError(f"presence message of {len(payload)} bytes is too large (at most {MAX_PRESENCE_BYTES})")
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"presence is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError("presence is not a JSON object")
    try:
        return Presence.model_validate(doc).model_dump(exclude_none=True)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "presence"
        raise ValueError(f"presence {where}: {err['msg']}") from None


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic-filter matching with ``+`` (one level) and ``#`` (the rest)."""
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts) or (part != "+" and part != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)
