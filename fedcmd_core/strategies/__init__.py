"""The algorithm registry: name -> Algorithm record (one file per algorithm), plus the algorithms that
installed packages add through the ``fedcmd.algorithms`` entry-point group (docs/WRITING_A_STRATEGY.md).
``simulate``, ``experiment``, ``cloud serve`` and the agent all resolve names here, so a plugin is found
by every one of them."""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from fedcmd_core.strategies import (
    fedap,
    fedavg,
    fedbabu,
    fedbn,
    fedcmd,
    fedcmd_noweight,
    feddyn,
    fedfomo,
    fedper,
    fedprox,
    fedrep,
    lgfedavg,
    local_only,
    pfedsim,
)
from fedcmd_core.strategies.base import (
    Algorithm,
    ClientContext,
    ClientData,
    ClientStrategy,
    HyperParams,
    ModelSpec,
    ServerContext,
    ServerStrategy,
    Task,
    Update,
)
from fedcmd_core.suggest import closest, unknown_key

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "fedcmd.algorithms"

BUILTIN: dict[str, Algorithm] = {
    a.name: a
    for a in (
        local_only.ALGORITHM,
        fedavg.ALGORITHM,
        fedper.ALGORITHM,
        pfedsim.ALGORITHM,
        fedcmd.ALGORITHM,
        fedprox.ALGORITHM,
        feddyn.ALGORITHM,
        fedbn.ALGORITHM,
        fedap.ALGORITHM,
        fedbabu.ALGORITHM,
        fedfomo.ALGORITHM,
        fedrep.ALGORITHM,
        lgfedavg.ALGORITHM,
        fedcmd_noweight.ALGORITHM,
    )
}
# name -> (cloud side, device side) of the built-in algorithms (plugins: see algorithms())
ALGORITHMS: dict[str, tuple[type[ServerStrategy], type[ClientStrategy]]] = {
    n: (a.server, a.client) for n, a in BUILTIN.items()
}
ALIASES = {"local-only": "local", "localonly": "local", "local_only": "local"}

_plugins: dict[str, Algorithm] | None = None
_plugin_errors: dict[str, str] = {}


def plugins() -> dict[str, Algorithm]:
    """The algorithms of installed packages (loaded once). A plugin that fails to load, is not an
    Algorithm, or takes a built-in name is left out with a warning; asking for it names the reason."""
    global _plugins
    if _plugins is None:
        found: dict[str, Algorithm] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            where = f"entry point {ep.name!r} ({ep.value})"
            try:
                record = ep.load()
            except Exception as e:  # a broken plugin must not take the built-in algorithms down with it
                _plugin_errors[ep.name] = f"{where} failed to load: {type(e).__name__}: {e}"
                continue
            if not isinstance(record, Algorithm):
                _plugin_errors[ep.name] = f"{where} is a {type(record).__name__}, not a fedcmd Algorithm record"
            elif record.name in BUILTIN or record.name in ALIASES:
                _plugin_errors[record.name] = f"{where} takes the built-in name {record.name!r}"
            elif record.name in found:
                _plugin_errors[record.name] = f"{where}: two installed packages define {record.name!r}"
            else:
                found[record.name] = record
        for name, why in _plugin_errors.items():
            log.warning("algorithm plugin %s left out: %s", name, why)
        _plugins = found
    return _plugins


def algorithms() -> dict[str, Algorithm]:
    """Every algorithm by name: the built-in ones, then the installed plugins."""
    return {**BUILTIN, **plugins()}


def record(name: str) -> Algorithm:
    key = ALIASES.get(name.lower(), name.lower())
    known = algorithms()
    if key not in known:
        why = f" ({_plugin_errors[key]})" if key in _plugin_errors else ""
        close = closest(key, [*known, *ALIASES])
        hint = f"; did you mean {ALIASES.get(close, close)!r}?" if close else ""
        raise ValueError(f"unknown algorithm {name!r}{why}{hint} (known: {', '.join(known)})")
    return known[key]


def algorithm(name: str) -> tuple[type[ServerStrategy], type[ClientStrategy]]:
    r = record(name)
    return r.server, r.client


def canonical_name(name: str) -> str:
    return record(name).name


def describe_hp_error(name: str, e: ValidationError) -> str:
    """One line for a bad hyper-parameter: the key, what is wrong and the value; an unknown key gets the
    closest valid key and the full list."""
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    algo = canonical_name(name)
    if err["type"] == "extra_forbidden":
        return f"bad hyper-parameter for {algo}: " + unknown_key(where, record(algo).params.model_fields, "key")
    msg = err["msg"].removeprefix("Value error, ")
    return f"bad hyper-parameter for {algo}: {where}: {msg} (got {err.get('input')!r})"


def parse_params(name: str, values: dict[str, Any]) -> HyperParams:
    """Validate an algorithm's hyper-parameters (pydantic: unknown keys and bad types raise)."""
    return record(name).params(**values)


__all__ = [
    "ALGORITHMS",
    "ENTRY_POINT_GROUP",
    "Algorithm",
    "ClientContext",
    "ClientData",
    "ClientStrategy",
    "HyperParams",
    "ModelSpec",
    "ServerContext",
    "ServerStrategy",
    "Task",
    "Update",
    "algorithm",
    "algorithms",
    "canonical_name",
    "describe_hp_error",
    "parse_params",
    "plugins",
    "record",
]
