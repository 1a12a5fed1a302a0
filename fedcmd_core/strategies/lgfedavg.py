"""LG-FedAvg (Liang et al., 2020, arXiv:2001.01523): each device keeps local representation layers; only
the last ``num_global_layers`` layers are global and averaged as in FedAvg.

Follows the paper (global layers on top). FL-bench's LG-FedAvg does the opposite: it lists the Conv/BN/Linear
modules and makes the *first* ``num_global_layers`` of them global. Layers here are the model's named
top-level layers, so for LeNet-5 the default shares ``classifier`` only.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from fedcmd_core.strategies.base import Algorithm, ClientStrategy, HyperParams, ServerContext, ServerStrategy


class LGFedAvgParams(HyperParams):
    num_global_layers: int = Field(1, ge=1, description="how many of the last layers are global")


class LGFedAvgServer(ServerStrategy):
    send_full_first = False  # local layers start from the (seeded) initial model every device already has

    def __init__(self, params: LGFedAvgParams, ctx: ServerContext) -> None:
        super().__init__(params, ctx)
        layers = ctx.spec.layer_names
        if params.num_global_layers > len(layers):
            raise ValueError(f"lgfedavg: num_global_layers={params.num_global_layers} > {len(layers)} layers")
        self.global_layers = layers[len(layers) - params.num_global_layers :]
        self.shared = ctx.spec.keys_of(self.global_layers)

    def shared_keys(self, rnd: int) -> list[str]:
        return self.shared

    def summary(self) -> dict[str, Any]:
        return {"global_layers": self.global_layers}


class LGFedAvgClient(ClientStrategy):
    """Device side: plain local training (the base class's)."""


ALGORITHM = Algorithm("lgfedavg", LGFedAvgParams, LGFedAvgServer, LGFedAvgClient)
