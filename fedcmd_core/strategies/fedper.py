"""FedPer (Arivazhagan et al., 2019, arXiv:1912.00818): the last layer (``classifier``) is personal and
stays on each device; the body is averaged as in FedAvg."""

from __future__ import annotations

from fedcmd_core.strategies.base import Algorithm, ClientStrategy
from fedcmd_core.strategies.fedavg import FedAvgParams, FedAvgServer


class FedPerParams(FedAvgParams):
    personal_layers: tuple[str, ...] = ("classifier",)


class FedPerServer(FedAvgServer):
    def shared_keys(self, rnd: int) -> list[str]:
        personal = set(self.ctx.spec.keys_of(self.params.personal_layers))
        return [k for k in super().shared_keys(rnd) if k not in personal]


class FedPerClient(ClientStrategy):
    """Device side: plain local training (the base class's)."""


ALGORITHM = Algorithm("fedper", FedPerParams, FedPerServer, FedPerClient)
