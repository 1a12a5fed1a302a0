"""FedCMD's personal-layer selection as a component: the voting rounds, the votes, the chosen layer.

FedCMD and its ablation without weighted aggregation (``fedcmd_noweight``) hold one each; what they do
once the layer is chosen differs, the selection does not. During ``rounds`` FedAvg rounds every device
votes per batch for a candidate layer (the device side is ``FedCMDClient.batch_hook``); the cloud takes
each device's mode, the round's mode over devices, and at the end the mode over rounds (ties: the layer
nearest the output). Checkpointed as one field (``to_state`` / ``load_state``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field

from fedcmd_core.selection import Embedding, SelectionMetric, mode, round_mode
from fedcmd_core.strategies.base import HyperParams, StateVersionError
from fedcmd_core.strategies.phases import PhaseLength, phase_rounds

if TYPE_CHECKING:
    from fedcmd_core.strategies.base import ServerContext, Update


class SelectionParams(HyperParams):
    """The personal-layer selection phase (shared with the ablation without weighted aggregation)."""

    selection_rounds: PhaseLength = Field(0.1, gt=0, description="fraction (< 1) or number of selection rounds")
    candidates: tuple[str, ...] | None = Field(None, description="candidate layers; default: fc*/classifier")
    selection_metric: SelectionMetric = "w1"
    embedding: Embedding = "minmax_mean"
    # every 3rd batch keeps the vote under 5 % of local training time (measured: 13 % on every batch)
    vote_every: int = Field(3, ge=1, description="vote on every k-th batch")


def default_candidates(layer_names: Sequence[str]) -> list[str]:
    fc = [n for n in layer_names if n.startswith("fc") or n == "classifier"]
    return fc if fc else list(layer_names[-3:])


class LayerVote:
    def __init__(self, params: SelectionParams, ctx: ServerContext) -> None:
        spec = ctx.spec
        self.candidates = list(params.candidates or default_candidates(spec.layer_names))
        unknown = [c for c in self.candidates if c not in spec.layer_names]
        if unknown:
            raise ValueError(f"candidate layers {unknown} are not layers of the model {spec.layer_names}")
        self.rounds = phase_rounds(params.selection_rounds, ctx.global_epoch, minimum=1)
        self.trainable = spec.trainable_keys()
        self._spec = spec
        self.round_modes: list[str | None] = []
        self.vote_totals: Counter[str] = Counter()
        self.client_votes: dict[int, dict[str, int]] = {}
        self.chosen: str | None = None

    def selecting(self, rnd: int) -> bool:
        return rnd < self.rounds

    def due(self, rnd: int) -> bool:
        """Choose now: the first round after the vote (or later, resuming a run stopped before it chose)."""
        return rnd == self.rounds or (rnd > self.rounds and self.chosen is None)

    def fit_config(self) -> dict[str, Any]:
        """A voting round's task: train and upload everything, vote among the candidates."""
        return {"upload": self.trainable, "vote": self.candidates}

    def candidate_keys(self) -> list[str]:
        return self._spec.keys_of(self.candidates)

    def record(self, updates: Mapping[int, Update]) -> str | None:
        """Count a voting round's votes (in the order of ``updates``); returns the round's layer."""
        votes = [updates[c].info.get("votes", {}) for c in updates]
        for c, v in zip(updates, votes):
            self.client_votes[c] = v
            self.vote_totals.update(v)
        rmode = round_mode(votes, self.candidates)
        self.round_modes.append(rmode)
        return rmode

    def choose(self) -> tuple[list[str], list[str]]:
        """Fix the chosen layer; returns (personal keys, body keys) of the trainable entries."""
        counts = Counter(m for m in self.round_modes if m is not None)
        self.chosen = mode(counts, self.candidates) or self.candidates[-1]
        personal = set(self._spec.keys_of([self.chosen]))
        return [k for k in self.trainable if k in personal], [k for k in self.trainable if k not in personal]

    def summary(self) -> dict[str, Any]:
        return {
            "chosen_layer": self.chosen,
            "selection_rounds": self.rounds,
            "round_layers": self.round_modes,
            "vote_counts": dict(self.vote_totals),
        }

    # --- checkpoint: the votes and the choice (candidates and rounds come from the config)
    def to_state(self) -> dict[str, Any]:
        return {
            "round_modes": list(self.round_modes),
            "vote_totals": dict(self.vote_totals),
            "client_votes": {c: dict(v) for c, v in self.client_votes.items()},
            "chosen": self.chosen,
        }

    def load_state(self, state: Any) -> None:
        if not isinstance(state, dict) or set(state) != {"round_modes", "vote_totals", "client_votes", "chosen"}:
            raise StateVersionError("the checkpoint's layer vote is not the one this fedcmd writes: start a new run")
        self.round_modes = list(state["round_modes"])
        self.vote_totals = Counter(state["vote_totals"])
        self.client_votes = {int(c): dict(v) for c, v in state["client_votes"].items()}
        self.chosen = state["chosen"]
