"""FedAvg (McMahan et al., AISTATS 2017): every device trains the global model; the cloud averages
the results weighted by local sample counts."""

from __future__ import annotations

from fedcmd_core.strategies.base import Algorithm, ClientStrategy, HyperParams, ServerStrategy


class FedAvgParams(HyperParams):
    # The textbook FedAvg averages BatchNorm running statistics too; the released FedCMD code kept
    # them on the device for every method. False reproduces that.
    share_bn_stats: bool = True


class FedAvgServer(ServerStrategy):
    def shared_keys(self, rnd: int) -> list[str]:
        spec = self.ctx.spec
        return spec.keys if self.params.share_bn_stats else spec.trainable_keys()


class FedAvgClient(ClientStrategy):
    """Device side: plain local training (the base class's)."""


ALGORITHM = Algorithm("fedavg", FedAvgParams, FedAvgServer, FedAvgClient)
