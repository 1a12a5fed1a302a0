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
from fedcmd_core.strategies.fedap import FedAPClient, FedAPServer
from fedcmd_core.strategies.fedavg import FedAvgClient, FedAvgServer
from fedcmd_core.strategies.fedbabu import FedBABUClient, FedBABUServer
from fedcmd_core.strategies.fedbn import FedBNClient, FedBNServer
from fedcmd_core.strategies.fedcmd import FedCMDClient, FedCMDServer
from fedcmd_core.strategies.fedcmd_noweight import FedCMDNoWeightClient, FedCMDNoWeightServer
from fedcmd_core.strategies.feddyn import FedDynClient, FedDynServer
from fedcmd_core.strategies.fedfomo import FedFomoClient, FedFomoServer
from fedcmd_core.strategies.fedper import FedPerClient, FedPerServer
from fedcmd_core.strategies.fedprox import FedProxClient, FedProxServer
from fedcmd_core.strategies.fedrep import FedRepClient, FedRepServer
from fedcmd_core.strategies.lgfedavg import LGFedAvgClient, LGFedAvgServer
from fedcmd_core.strategies.local_only import LocalOnlyClient, LocalOnlyServer
from fedcmd_core.strategies.pfedsim import PFedSimClient, PFedSimServer

ALGORITHMS: dict[str, tuple[type[ServerStrategy], type[ClientStrategy]]] = {
    "local": (LocalOnlyServer, LocalOnlyClient),
    "fedavg": (FedAvgServer, FedAvgClient),
    "fedper": (FedPerServer, FedPerClient),
    "pfedsim": (PFedSimServer, PFedSimClient),
    "fedcmd": (FedCMDServer, FedCMDClient),
    "fedprox": (FedProxServer, FedProxClient),
    "feddyn": (FedDynServer, FedDynClient),
    "fedbn": (FedBNServer, FedBNClient),
    "fedap": (FedAPServer, FedAPClient),
    "fedbabu": (FedBABUServer, FedBABUClient),
    "fedfomo": (FedFomoServer, FedFomoClient),
    "fedrep": (FedRepServer, FedRepClient),
    "lgfedavg": (LGFedAvgServer, LGFedAvgClient),
    "fedcmd_noweight": (FedCMDNoWeightServer, FedCMDNoWeightClient),
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
