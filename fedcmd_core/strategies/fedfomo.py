"""FedFomo (Zhang et al., ICLR 2021, arXiv:2012.08565): the cloud sends each device the models of M other
clients; the device weights them by first-order loss improvement on its validation split and mixes them.

As FL-bench: peers are the M clients of the previous round with the highest entries in the device's row
of the cloud's learned weight matrix P (P += the weights each device reports); no peers in the first round
or in evaluation tasks; w_j = (L_own - L_j) / (||theta_j - theta_own|| + 1e-5) on the validation split
(``valset_ratio`` of the train split, never trained on), clipped at 0 and normalised; no positive weight
keeps the own model. Deviations: ties in P (all of them at first) are broken at random, which is the
paper's exploration in spirit (we do not run its epsilon-greedy schedule), and a device is never its own peer
(FL-bench may pick it among the top M, which only wastes a slot). The validation split is fixed per device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field, StringConstraints

from fedcmd_core.params import Arrays, flatten, float_keys, load_arrays, model_arrays, weighted_average
from fedcmd_core.strategies.base import (
    Algorithm,
    ClientContext,
    ClientStrategy,
    HyperParams,
    NoInfo,
    ServerContext,
    ServerStrategy,
    Task,
    Update,
)
from fedcmd_core.training import evaluate

SEP = "::"  # peer arrays travel as "peer<j>::<key>"


def peer_key(cid: int, key: str) -> str:
    return f"peer{cid}{SEP}{key}"


def split_peers(arrays: Arrays) -> tuple[Arrays, dict[int, Arrays]]:
    """A task's own entries and its peer models by client id."""
    own: Arrays = {}
    peers: dict[int, Arrays] = {}
    for k, v in arrays.items():
        if k.startswith("peer") and SEP in k:
            head, key = k.split(SEP, 1)
            peers.setdefault(int(head[len("peer") :]), {})[key] = v
        else:
            own[k] = v
    return own, peers


def split_train(ctx: ClientContext, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded split of the device's train split: (first ``fraction``, rest) as index tensors."""
    n = int(ctx.data.x_train.shape[0])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.seed * 7_919 + ctx.client_id))
    k = int(n * fraction)
    return order[:k], order[k:]


@contextmanager
def training_on(ctx: ClientContext, index: torch.Tensor) -> Iterator[None]:
    """Train on a subset of the device's train split (evaluation still sees the whole splits)."""
    data = ctx.data
    ctx.data = replace(data, x_train=data.x_train[index], y_train=data.y_train[index])
    try:
        yield
    finally:
        ctx.data = data


class FedFomoParams(HyperParams):
    M: int = Field(5, ge=0, description="peer models sent to each device")
    valset_ratio: float = Field(0.2, ge=0, lt=1, description="fraction of the train split used for weighting")


class FedFomoInfo(NoInfo):
    """The weights a device gave its peers' models this round (peer id as text -> weight)."""

    weights: dict[Annotated[str, StringConstraints(max_length=20)], float] = Field(
        default_factory=dict, max_length=100_000
    )


class FedFomoServer(ServerStrategy):
    Info = FedFomoInfo
    state_fields = ("P", "models", "previous", "rng")

    def __init__(self, params: FedFomoParams, ctx: ServerContext) -> None:
        super().__init__(params, ctx)
        self.params: FedFomoParams = params
        self.P = np.eye(ctx.num_clients)
        self.models: dict[int, Arrays] = {}  # every client's last uploaded model, kept by the cloud
        self.previous: list[int] = []
        self.rng = np.random.default_rng(ctx.seed)

    def phase(self, rnd: int) -> str:
        return "personal"

    def peers_for(self, cid: int) -> list[int]:
        candidates = [j for j in self.previous if j != cid and j in self.models]
        if not candidates or self.params.M == 0:
            return []
        scores = self.P[cid, candidates]
        order = np.lexsort((self.rng.random(len(candidates)), -scores))  # best first, random among ties
        return [candidates[i] for i in order[: self.params.M]]

    def configure_fit(self, rnd: int, cid: int) -> Task:
        arrays = {peer_key(j, k): v for j in self.peers_for(cid) for k, v in self.models[j].items()}
        return Task(rnd, "fit", arrays, {"upload": self.ctx.spec.keys})

    def configure_evaluate(self, rnd: int, cid: int) -> Task:
        return Task(rnd, "evaluate", {}, {})  # each device evaluates its own model

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> dict[str, Any]:
        done = list(updates)
        for c in done:
            update = updates[c]
            self.models[c] = {k: np.array(v, copy=True) for k, v in update.arrays.items()}
            for j, w in _weights(update.info.get("weights"), self.ctx.num_clients):
                self.P[c, j] += w
        self.previous = done
        return {}


def _weights(reported: Any, num_clients: int) -> list[tuple[int, float]]:
    """The (client, weight) pairs of a device's report that make sense; the rest comes off the wire: dropped."""
    if not isinstance(reported, dict):
        return []
    out: list[tuple[int, float]] = []
    for j, w in reported.items():
        try:
            j, w = int(j), float(w)
        except (TypeError, ValueError):
            continue
        if 0 <= j < num_clients and math.isfinite(w):
            out.append((j, w))
    return out


class FedFomoClient(ClientStrategy):
    def __init__(self, params: FedFomoParams, ctx: ClientContext) -> None:
        super().__init__(params, ctx)
        self.params: FedFomoParams = params
        self.val_index, self.train_index = split_train(ctx, params.valset_ratio)
        self.weights: dict[int, float] = {}

    def _load(self, task: Task) -> None:
        own, peers = split_peers(task.arrays)
        super()._load(Task(task.round, task.kind, own, task.config))
        self.weights = self._mix(peers) if peers else {}

    def _val_loss(self) -> float:
        x, y = self.ctx.data.x_train[self.val_index], self.ctx.data.y_train[self.val_index]
        res = evaluate(self.ctx.model, x, y)
        return res.loss_sum / res.count if res.count else 0.0

    def _mix(self, peers: dict[int, Arrays]) -> dict[int, float]:
        """First-order weights of the peers; loads their weighted mix when any weight is positive."""
        names = [n for n, p in self.ctx.model.named_parameters() if p.requires_grad]
        own = model_arrays(self.ctx.model)
        own_vec = flatten(own, names).astype(np.float64)
        own_loss = self._val_loss()
        weights: dict[int, float] = {}
        for j, arrays in peers.items():
            load_arrays(self.ctx.model, {k: v for k, v in arrays.items() if k in own})
            distance = float(np.linalg.norm(flatten(arrays, names).astype(np.float64) - own_vec))
            weights[j] = (own_loss - self._val_loss()) / (distance + 1e-5)
        load_arrays(self.ctx.model, own)
        w = np.maximum(np.asarray(list(weights.values())), 0.0)
        if w.sum() > 0:
            states = list(peers.values())
            keys = [k for k in float_keys(own, own) if all(k in s for s in states)]
            load_arrays(self.ctx.model, weighted_average(states, list(w), keys))
        return weights

    def local_train(self, task: Task, generator: torch.Generator) -> None:
        with training_on(self.ctx, self.train_index):  # the validation split is never trained on
            super().local_train(task, generator)

    def upload(self, task: Task, received: Arrays) -> tuple[Arrays, dict[str, Any]]:
        arrays, info = super().upload(task, received)
        info["weights"] = {str(j): w for j, w in self.weights.items()}
        return arrays, info


ALGORITHM = Algorithm("fedfomo", FedFomoParams, FedFomoServer, FedFomoClient)
