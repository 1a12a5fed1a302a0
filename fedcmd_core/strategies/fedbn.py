"""FedBN (Li et al., ICLR 2021, arXiv:2102.07623): every BatchNorm layer (affine weight and bias AND its
running statistics) stays on the device; everything else is averaged as in FedAvg.

Follows the paper and FL-bench (FL-bench matches BN entries by the substring "bn" in their names; we find
them structurally: a module with ``running_mean`` is a norm layer). BN entries are never sent, not even on
a device's first contact: they would only carry the initial values the device already has.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedcmd_core.strategies.base import Algorithm, ClientStrategy, HyperParams, ServerContext, ServerStrategy


def bn_keys(keys: Iterable[str]) -> set[str]:
    """Every state entry of a BatchNorm-like module: the ones with running statistics."""
    keys = list(keys)
    prefixes = {k[: -len("running_mean")] for k in keys if k.endswith("running_mean")}
    return {k for k in keys if any(k.startswith(p) and "." not in k[len(p) :] for p in prefixes)}


class FedBNServer(ServerStrategy):
    send_full_first = False  # the first-contact top-up would send BN layers (at their initial values)

    def __init__(self, params: HyperParams, ctx: ServerContext) -> None:
        super().__init__(params, ctx)
        local = bn_keys(ctx.spec.keys)
        self.shared = [k for k in ctx.spec.keys if k not in local]

    def shared_keys(self, rnd: int) -> list[str]:
        return self.shared


class FedBNClient(ClientStrategy):
    """Device side: plain local training (the base class's)."""


ALGORITHM = Algorithm("fedbn", HyperParams, FedBNServer, FedBNClient)
