"""FedCMD without weighted aggregation (the ablation of Zhang et al., IEEE Trans. Computers 2024,
arXiv:2403.02360): FedCMD's layer-selection phase, then the chosen layer stays local and the body is FedAvg.

Phase 1 is FedCMD's unchanged (FedAvg rounds with layer votes). Phase 2 sends every device the same body and
averages the uploaded bodies weighted by sample counts; the chosen layer and BN statistics stay on the device
and, unlike FedCMD, not even the personal-layer update is uploaded (there is no similarity to compute).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field, model_validator

from fedcmd_core.selection import Embedding, SelectionMetric
from fedcmd_core.strategies.base import HyperParams, ServerStrategy, Task
from fedcmd_core.strategies.fedcmd import FedCMDClient, FedCMDServer


class FedCMDNoWeightParams(HyperParams):
    # FedCMD's selection knobs only: the weighting and relay knobs have no meaning here.
    selection_rounds: float = Field(0.1, gt=0, description="fraction (< 1) or number of selection rounds")
    candidates: tuple[str, ...] | None = Field(None, description="candidate layers; default: fc*/classifier")
    selection_metric: SelectionMetric = "w1"
    embedding: Embedding = "minmax_mean"
    vote_every: int = Field(1, ge=1, description="vote on every k-th batch")

    @model_validator(mode="after")
    def _check(self) -> FedCMDNoWeightParams:
        if self.selection_rounds >= 1 and self.selection_rounds != int(self.selection_rounds):
            raise ValueError("selection_rounds must be a fraction < 1 or a whole number of rounds")
        return self


class FedCMDNoWeightServer(FedCMDServer):
    name = "fedcmd_noweight"
    Params = FedCMDNoWeightParams

    def sequential(self, rnd: int) -> bool:
        return False

    def begin_round(self, rnd: int, cids: Sequence[int]) -> None:
        if rnd == self.phase1 or (rnd > self.phase1 and self.chosen is None):
            self._finish_selection()

    def configure_fit(self, rnd: int, cid: int) -> Task:
        if rnd < self.phase1:
            return super().configure_fit(rnd, cid)
        # No "personal" key: the device uploads no personal-layer update.
        return Task(rnd, "fit", {k: self.global_arrays[k] for k in self.body_keys}, {"upload": self.body_keys})

    def configure_evaluate(self, rnd: int, cid: int) -> Task:
        if rnd < self.phase1:
            return super().configure_evaluate(rnd, cid)
        return Task(rnd, "evaluate", {k: self.global_arrays[k] for k in self.body_keys}, {})

    def on_update(self, rnd: int, cid: int, update: Any) -> None:
        self.pending[cid] = update

    def end_round(self, rnd: int, cids: Sequence[int]) -> dict[str, Any]:
        if rnd < self.phase1:
            return super().end_round(rnd, cids)
        return ServerStrategy.end_round(self, rnd, cids)  # sample-weighted FedAvg of the uploaded body

    def summary(self) -> dict[str, Any]:
        return {
            "chosen_layer": self.chosen,
            "selection_rounds": self.phase1,
            "round_layers": self.round_modes,
            "vote_counts": dict(self.vote_totals),
        }


class FedCMDNoWeightClient(FedCMDClient):
    name = "fedcmd_noweight"
    Params = FedCMDNoWeightParams
