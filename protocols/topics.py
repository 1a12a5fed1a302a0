"""Topic scheme under ``fedcmd/<fleet>/`` (a device publishes only under its own client id)."""

from __future__ import annotations


def task_topic(fleet: str, client: int) -> str:
    return f"fedcmd/{fleet}/client/{client}/task"


def update_topic(fleet: str, client: int) -> str:
    return f"fedcmd/{fleet}/client/{client}/update"


def updates_filter(fleet: str) -> str:
    return f"fedcmd/{fleet}/client/+/update"


def status_topic(fleet: str) -> str:
    return f"fedcmd/{fleet}/status"


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic-filter matching with ``+`` (one level) and ``#`` (the rest)."""
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts) or (part != "+" and part != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)
