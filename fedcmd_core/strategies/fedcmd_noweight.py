"""FedCMD without weighted aggregation (the ablation of Zhang et al., IEEE Trans. Computers 2024,
arXiv:2403.02360): FedCMD's layer-selection phase, then the chosen layer stays local and the body is FedAvg.

A composition, not a FedCMD with its weighting switched off: the selection phase is FedCMD's own component
(``LayerVote``, FedAvg rounds with layer votes); afterwards every device gets the same body and the cloud
averages the uploaded bodies weighted by sample counts (the base class's ``aggregate``). The chosen layer and
BN statistics stay on the device and, unlike FedCMD, not even the personal-layer update is uploaded (there
is no similarity to compute).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedcmd_core.strategies.base import Algorithm, ServerContext, ServerStrategy, Task, Update
from fedcmd_core.strategies.fedcmd import FedCMDClient, VoteInfo
from fedcmd_core.strategies.layer_vote import LayerVote, SelectionParams


class FedCMDNoWeightParams(SelectionParams):
    """FedCMD's selection knobs only: the weighting and relay knobs have no meaning here."""


class FedCMDNoWeightServer(ServerStrategy):
    Info = VoteInfo
    state_version = 2  # version 1 was FedCMD's whole state
    state_fields = ("vote", "body_keys", "personal_keys")

    def __init__(self, params: FedCMDNoWeightParams, ctx: ServerContext) -> None:
        super().__init__(params, ctx)
        try:
            self.vote = LayerVote(params, ctx)
        except ValueError as e:
            raise ValueError(f"fedcmd_noweight: {e}") from None
        self.body_keys: list[str] = []
        self.personal_keys: list[str] = []

    def phase(self, rnd: int) -> str:
        return "select" if self.vote.selecting(rnd) else "personal"

    def shared_keys(self, rnd: int) -> list[str]:
        return self.vote.trainable if self.vote.selecting(rnd) else self.body_keys

    def begin_round(self, rnd: int, cids: Sequence[int]) -> None:
        if self.vote.due(rnd):
            self.personal_keys, self.body_keys = self.vote.choose()

    def configure_fit(self, rnd: int, cid: int) -> Task:
        keys = self.shared_keys(rnd)
        # after the vote no "personal" key: the device uploads no personal-layer update
        config = self.vote.fit_config() if self.vote.selecting(rnd) else {"upload": keys}
        return Task(rnd, "fit", {k: self.global_arrays[k] for k in keys}, config)

    def configure_evaluate(self, rnd: int, cid: int) -> Task:
        return Task(rnd, "evaluate", {k: self.global_arrays[k] for k in self.shared_keys(rnd)}, {})

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> dict[str, Any]:
        facts = {"round_layer": self.vote.record(updates)} if self.vote.selecting(rnd) else {}
        super().aggregate(rnd, updates)  # sample-weighted FedAvg of what was uploaded
        return facts

    def summary(self) -> dict[str, Any]:
        return self.vote.summary()


class FedCMDNoWeightClient(FedCMDClient):
    """Device side: FedCMD's (layer votes in the selection rounds, nothing personal uploaded after)."""


ALGORITHM = Algorithm("fedcmd_noweight", FedCMDNoWeightParams, FedCMDNoWeightServer, FedCMDNoWeightClient)
