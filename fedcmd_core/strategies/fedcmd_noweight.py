"""FedCMD without weighted aggregation (the ablation of Zhang et al., IEEE Trans. Computers 2024,
arXiv:2403.02360): FedCMD's layer-selection phase, then the chosen layer stays local and the body is FedAvg.

Phase 1 is FedCMD's unchanged (FedAvg rounds with layer votes). Phase 2 sends every device the same body and
averages the uploaded bodies weighted by sample counts; the chosen layer and BN statistics stay on the device
and, unlike FedCMD, not even the personal-layer update is uploaded (there is no similarity to compute).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedcmd_core.strategies.base import Algorithm, ServerStrategy, Task, Update
from fedcmd_core.strategies.fedcmd import FedCMDClient, FedCMDServer, SelectionParams


class FedCMDNoWeightParams(SelectionParams):
    """FedCMD's selection knobs only: the weighting and relay knobs have no meaning here."""


class FedCMDNoWeightServer(FedCMDServer):
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

    def on_update(self, rnd: int, cid: int, update: Update) -> None:
        pass  # never a relay

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> dict[str, Any]:
        if rnd < self.phase1:
            return super().aggregate(rnd, updates)
        return ServerStrategy.aggregate(self, rnd, updates)  # sample-weighted FedAvg of the uploaded body

    def summary(self) -> dict[str, Any]:
        return {
            "chosen_layer": self.chosen,
            "selection_rounds": self.phase1,
            "round_layers": self.round_modes,
            "vote_counts": dict(self.vote_totals),
        }


class FedCMDNoWeightClient(FedCMDClient):
    """Device side: FedCMD's (layer votes in the selection rounds, nothing personal uploaded after)."""


ALGORITHM = Algorithm("fedcmd_noweight", FedCMDNoWeightParams, FedCMDNoWeightServer, FedCMDNoWeightClient)
