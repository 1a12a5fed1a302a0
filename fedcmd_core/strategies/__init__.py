"""The algorithm registry: name -> (cloud side, device side). One file per algorithm."""

from __future__ import annotations

from typing import Any

from fedcmd_core.strategies.base import (
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
from fedcmd_core.strategies.fedavg import FedAvgClient, FedAvgServer
from fedcmd_core.strategies.fedcmd import FedCMDClient, FedCMDServer
from fedcmd_core.strategies.fedper import FedPerClient, FedPerServer
from fedcmd_core.strategies.local_only import LocalOnlyClient, LocalOnlyServer
from fedcmd_core.strategies.pfedsim import PFedSimClient, PFedSimServer

ALGORITHMS: dict[str, tuple[type[ServerStrategy], type[ClientStrategy]]] = {
    "local": (LocalOnlyServer, LocalOnlyClient),
    "fedavg": (FedAvgServer, FedAvgClient),
    "fedper": (FedPerServer, FedPerClient),
    "pfedsim": (PFedSimServer, PFedSimClient),
    "fedcmd": (FedCMDServer, FedCMDClient),
}
ALIASES = {"local-only": "local", "localonly": "local", "local_only": "local"}


def algorithm(name: str) -> tuple[type[ServerStrategy], type[ClientStrategy]]:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; known algorithms: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[key]


def canonical_name(name: str) -> str:
    algorithm(name)
    return ALIASES.get(name.lower(), name.lower())


def parse_params(name: str, values: dict[str, Any]) -> HyperParams:
    """Validate an algorithm's hyper-parameters (pydantic: unknown keys and bad types raise)."""
    server_cls, _ = algorithm(name)
    return server_cls.Params(**values)


__all__ = [
    "ALGORITHMS",
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
    "canonical_name",
    "parse_params",
]
