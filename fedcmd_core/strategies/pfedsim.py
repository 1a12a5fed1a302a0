"""pFedSim (Tan et al., 2023, arXiv:2305.15706): FedAvg warm-up, then the classifier is personal and each
device's body is a mix of all stored bodies weighted by classifier similarity.

As FL-bench's implementation: similarity s_ij = max(0, row-mean cosine of the classifier weights),
updated among each round's clients; mixing weights -log(1 - s_ij) with 0.9999 for oneself, so pairs
never compared (s = 0) get no weight. The classifier is uploaded (the cloud needs it for similarity)
but never sent back. BatchNorm statistics stay on the device in both phases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import Field

from fedcmd_core import kernels
from fedcmd_core.params import Arrays, flatten, unflatten
from fedcmd_core.strategies.base import (
    Algorithm,
    ClientStrategy,
    HyperParams,
    ServerContext,
    ServerStrategy,
    Task,
    Update,
)
from fedcmd_core.strategies.bodies import BodyStore
from fedcmd_core.strategies.phases import PhaseLength, phase_rounds


class PFedSimParams(HyperParams):
    warmup_round: PhaseLength = Field(0.5, ge=0, description="fraction (< 1) or number of FedAvg warm-up rounds")
    personal_layers: tuple[str, ...] = ("classifier",)


class PFedSimServer(ServerStrategy):
    state_version = 2  # version 1 kept a list with every client's body
    state_fields = ("weights", "bodies", "heads")

    def __init__(self, params: PFedSimParams, ctx: ServerContext) -> None:
        super().__init__(params, ctx)
        self.params: PFedSimParams = params
        self.warmup = phase_rounds(params.warmup_round, ctx.global_epoch)
        spec = ctx.spec
        personal = set(spec.keys_of(params.personal_layers))
        self.body_keys = [k for k in spec.trainable_keys() if k not in personal]
        self.personal_keys = [k for k in spec.trainable_keys() if k in personal]
        self.weights = np.eye(ctx.num_clients)
        # per client, its flattened body since it last trained (a client not in it has the warmed-up body)
        self.bodies = BodyStore(ctx.body_budget_bytes, ctx.spill_dir, "bodies")
        self.heads: dict[int, np.ndarray] = {}  # per client, the personal weight matrix for similarity
        self._round_bodies: dict[int, np.ndarray] = {}

    def phase(self, rnd: int) -> str:
        return "warmup" if rnd < self.warmup else "personal"

    def shared_keys(self, rnd: int) -> list[str]:
        return self.ctx.spec.trainable_keys() if rnd < self.warmup else self.body_keys

    def begin_round(self, rnd: int, cids: Sequence[int]) -> None:
        if rnd < self.warmup:
            return
        mix = np.stack([self._mixing(c) for c in cids])
        agg = kernels.weighted_aggregate(mix, self._every_body())
        self._round_bodies = {c: agg[i] for i, c in enumerate(cids)}

    def _every_body(self) -> list[np.ndarray]:
        """Every client's body, in client order (after warm-up the global model is the warmed-up one)."""
        start = flatten(self.global_arrays, self.body_keys)
        return [self.bodies.get(c, start) for c in range(self.ctx.num_clients)]

    def _mixing(self, cid: int) -> np.ndarray:
        row = self.weights[cid].copy()
        if row.sum() <= 1:  # never compared with anyone: keep its own body
            out = np.zeros_like(row)
            out[cid] = 1.0
            return out
        row[cid] = 0.9999
        row = -np.log(1.0 - row)
        return row / row.sum()

    def configure_fit(self, rnd: int, cid: int) -> Task:
        if rnd < self.warmup:
            return super().configure_fit(rnd, cid)
        body = self._round_bodies.get(cid)
        if body is None:  # evaluation of a client outside the round
            body = kernels.weighted_aggregate(self._mixing(cid)[None, :], self._every_body())[0]
        arrays = unflatten(body, self.global_arrays, self.body_keys)
        return Task(rnd, "fit", arrays, {"upload": self.body_keys + self.personal_keys})

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> dict[str, Any]:
        if rnd < self.warmup:
            return super().aggregate(rnd, updates)
        done = list(updates)
        for c in done:
            arrays: Arrays = updates[c].arrays
            self.bodies[c] = flatten(arrays, self.body_keys)
            self.heads[c] = _weight_rows(arrays, self.personal_keys)
        if len(done) > 1:
            sims = kernels.rowwise_mean_cosine_matrix(np.stack([self.heads[c] for c in done]))
            for a, i in enumerate(done):
                for b, j in enumerate(done):
                    if i != j:
                        self.weights[i, j] = max(0.0, float(sims[a, b]))
        self._round_bodies = {}
        return {}


def _weight_rows(arrays: Arrays, keys: Sequence[str]) -> np.ndarray:
    """The personal layer's weight matrix [out, in] (FL-bench compares ``classifier.weight`` only)."""
    weight = next(k for k in keys if k.endswith("weight"))
    w = np.asarray(arrays[weight], dtype=np.float64)
    return w.reshape(w.shape[0], -1)


class PFedSimClient(ClientStrategy):
    """Device side: plain local training (the base class's)."""


ALGORITHM = Algorithm("pfedsim", PFedSimParams, PFedSimServer, PFedSimClient)
