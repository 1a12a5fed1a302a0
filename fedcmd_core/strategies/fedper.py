"""FedPer (Arivazhagan et al., 2019, arXiv:1912.00818): the last layer (``classifier``) is personal and
stays on each device; the body is averaged as in FedAvg."""

from __future__ import annotations

from fedcmd_core.strategies.base import ClientStrategy
from fedcmd_core.strategies.fedavg import FedAvgParams, FedAvgServer


class FedPerParams(FedAvgParams):
    personal_layers: tuple[str, ...] = ("classifier",)


class FedPerServer(FedAvgServer):
    name = "fedper"
    Params = FedPerParams

    def shared_keys(self, rnd: int) -> list[str]:
        personal = set(self.ctx.spec.keys_of(self.params.personal_layers))
        return [k for k in super().shared_keys(rnd) if k not in personal]


class FedPerClient(ClientStrategy):
    name = "fedper"
    Params = FedPerParams
