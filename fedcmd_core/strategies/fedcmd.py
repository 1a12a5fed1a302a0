"""FedCMD (Zhang et al., IEEE Trans. Computers 2024, arXiv:2403.02360) as DESIGN.md §2 defines it.

Phase 1 (``selection_rounds``): FedAvg rounds during which every device votes, batch by batch, for the
layer whose Wasserstein layer-embedding shift best matches its own input->label shift; the cloud takes
the mode per client, per round, then over rounds. Phase 2: the chosen layer and BN statistics stay on
the device. ``body_mode="weighted"`` gives device i the body sum_j Phi_ij theta_j / sum_j Phi_ij over
the stored (detached) bodies, Phi_ij = exp(s_ij / tau), s_ij = max(0, row-mean cos(dW_i, dW_j)) of
the personal-layer updates; ``body_mode="relay"`` passes the body from device to device in sampling
order, which is what the released code computed (REFERENCE.md §6).

Defaults (issue 11, docs/RESEARCH.md): the weighted form mixes only the bodies of the last round
(``max_staleness=1``) and steps ``server_lr=8`` times along their similarity-weighted update,
body_i = sum_j Phi_ij theta_j + (server_lr - 1) sum_j Phi_ij (theta_j - start_j), plus server momentum
(``server_momentum=0.3``, FedAvgM-style: 8 x 0.3 x the previous rounds' velocity); every device of a round
trains at the same time. ``variant="described"`` is the paper's literal form (all stored bodies, plain
mixing: max_staleness 0, server_lr 1), which collapses at alpha >= 0.5 (docs/REPRODUCING.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field, StringConstraints, model_validator

from fedcmd_core import kernels
from fedcmd_core.params import Arrays, flatten, model_arrays, unflatten
from fedcmd_core.selection import layer_distances
from fedcmd_core.strategies.base import (
    Algorithm,
    ClientStrategy,
    NoInfo,
    ServerContext,
    ServerStrategy,
    Task,
    Update,
)
from fedcmd_core.strategies.bodies import BodyStore
from fedcmd_core.strategies.layer_vote import LayerVote, SelectionParams

DELTA = "delta::"  # prefix of uploaded personal-layer updates


# The paper's literal form (``variant="described"``): every stored body mixed, plain mixing (no server step).
DESCRIBED = {"max_staleness": 0, "server_lr": 1.0, "server_momentum": 0.0}


class FedCMDParams(SelectionParams):
    """Defaults: the parallel form chosen in docs/RESEARCH.md (issue 11): only the bodies of the last round
    are mixed, the cloud steps ``server_lr`` times along the mixed update, with server momentum 0.3.
    ``variant="described"`` is the paper's literal form (all stored bodies, plain mixing)."""

    variant: Literal["default", "described"] = Field(
        "default", description="described: the paper's literal form (max_staleness 0, server_lr 1)"
    )
    body_mode: Literal["weighted", "relay"] = "weighted"
    tau: float = Field(1.0, gt=0, description="temperature of Phi = exp(s / tau)")
    unknown_similarity: float = Field(0.0, ge=0, le=1, description="s for pairs never compared")
    top_k: int = Field(0, ge=0, description="weighted mode: keep only the k most similar bodies (0: all)")
    size_weighting: bool = Field(False, description="weighted mode: multiply Phi_ij by n_j")
    self_weight: float = Field(0.0, ge=0, description="weighted mode: extra weight on one's own body")
    max_staleness: int = Field(1, ge=0, description="weighted mode: only bodies from the last k rounds (0: all)")
    server_lr: float = Field(
        8.0, gt=0, description="weighted mode: step on the mixed body update; 1 is the paper's plain mixing"
    )
    server_momentum: float = Field(
        0.3, ge=0, lt=1, description="weighted mode: FedAvgM-style momentum on the round's mean body update"
    )

    @model_validator(mode="before")
    @classmethod
    def _described(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("variant") == "described":
            data = {**DESCRIBED, **data}
        return data

    @model_validator(mode="after")
    def _check_variant(self) -> FedCMDParams:
        if self.variant == "described" and any(getattr(self, k) != v for k, v in DESCRIBED.items()):
            given = ", ".join(f"{k}={getattr(self, k)}" for k in DESCRIBED)
            raise ValueError(f"variant=described is max_staleness=0, server_lr=1, server_momentum=0 (got {given})")
        return self


class VoteInfo(NoInfo):
    """Selection rounds: how many batches voted for each candidate layer (bounded: names, entries, counts)."""

    votes: dict[Annotated[str, StringConstraints(max_length=64)], Annotated[int, Field(ge=0, le=10**9)]] = Field(
        default_factory=dict, max_length=64
    )


class FedCMDServer(ServerStrategy):
    Info = VoteInfo
    # version 1 kept the vote's four fields separately; 2 kept sim as an n x n matrix over every client id
    state_version = 3
    state_fields = (
        "vote",
        "body_keys",
        "personal_keys",
        "bodies",
        "body_round",
        "sent",
        "deltas",
        "sizes",
        "sim",
        "sim_clients",
        "relay_body",
        "velocity",
        "push",
        "last_mean_body",
    )

    def __init__(self, params: FedCMDParams, ctx: ServerContext) -> None:
        super().__init__(params, ctx)
        self.params: FedCMDParams = params
        try:
            self.vote = LayerVote(params, ctx)  # phase 1: which layer stays on the devices
        except ValueError as e:
            raise ValueError(f"fedcmd: {e}") from None
        self.trainable = self.vote.trainable
        self.body_keys: list[str] = []
        self.personal_keys: list[str] = []
        # the two per-client body stores share the context's memory budget (bodies.py: the rest spills to disk)
        half = ctx.body_budget_bytes // 2
        self.bodies = BodyStore(half, ctx.spill_dir, "bodies")  # detached flattened trainable state per client
        self.body_round: dict[int, int] = {}  # the round each stored body comes from
        self.sent = BodyStore(half, ctx.spill_dir, "sent")  # the body each client last started from (server_lr)
        self.deltas: dict[int, dict[str, np.ndarray]] = {}  # personal-candidate updates per client
        self.sizes: dict[int, int] = {}
        # s_ij among the clients holding a personal-layer update, rows and columns in sim_clients' order (None:
        # sim is indexed by client id). Not n x n: 10,000 clients made that 800 MB, rebuilt every round.
        self.sim: np.ndarray | None = None
        self.sim_clients: list[int] | None = None
        self._sim_pos: tuple[list[int], dict[int, int]] | None = None  # sim_clients' positions (derived)
        self.relay_body: np.ndarray | None = None
        self.velocity: np.ndarray | None = None  # server_momentum: running sum of the rounds' mean body updates
        self.push: np.ndarray | None = None  # what momentum adds to every body mixed for the next round
        self.last_mean_body: np.ndarray | None = None  # mean body sent last round (diagnostics: body drift)
        self.diagnostics: dict[str, float] = {}  # this round's mixing diagnostics, returned by aggregate
        self._round_bodies: dict[int, np.ndarray] = {}

    # ----------------------------------------------------------------------------------- structure
    def phase(self, rnd: int) -> str:
        return "select" if self.vote.selecting(rnd) else "personal"

    def sequential(self, rnd: int) -> bool:
        return not self.vote.selecting(rnd) and self.params.body_mode == "relay"

    def shared_keys(self, rnd: int) -> list[str]:
        return self.trainable if self.vote.selecting(rnd) else self.body_keys

    # ----------------------------------------------------------------------------------- dispatch
    def begin_round(self, rnd: int, cids: Sequence[int]) -> None:
        if self.vote.due(rnd):
            self._finish_selection()
        if not self.vote.selecting(rnd) and self.params.body_mode == "weighted":
            diag: dict[str, float] = {}
            bodies = self._weighted_bodies(cids, diag, rnd)
            self._round_bodies = dict(zip(cids, bodies))
            mean = bodies.mean(axis=0)
            last = self.last_mean_body
            if last is not None:
                diag["body_drift"] = float(np.linalg.norm(mean - last))  # how far the sent bodies moved
            self.last_mean_body = mean
            self.diagnostics = diag

    def configure_fit(self, rnd: int, cid: int) -> Task:
        if self.vote.selecting(rnd):
            return Task(rnd, "fit", {k: self.global_arrays[k] for k in self.trainable}, self.vote.fit_config())
        body = self._body_for(cid)
        self.sent[cid] = body  # what this device starts from: server_lr steps along theta - start
        arrays = unflatten(body, self.global_arrays, self.body_keys)
        return Task(rnd, "fit", arrays, {"upload": self.body_keys, "personal": self.personal_keys})

    def configure_evaluate(self, rnd: int, cid: int) -> Task:
        if self.vote.selecting(rnd):
            return Task(rnd, "evaluate", {k: self.global_arrays[k] for k in self.trainable}, {})
        return Task(rnd, "evaluate", unflatten(self._body_for(cid), self.global_arrays, self.body_keys), {})

    def _body_for(self, cid: int) -> np.ndarray:
        if self.params.body_mode == "relay":
            assert self.relay_body is not None
            return self.relay_body
        body = self._round_bodies.get(cid)
        return self._weighted_bodies([cid])[0] if body is None else body

    def expected_upload(self, task: Task) -> list[str]:
        # phase 2: the body, plus the update (never the weights) of the personal layer
        return super().expected_upload(task) + [DELTA + k for k in task.config.get("personal", [])]

    def on_update(self, rnd: int, cid: int, update: Update) -> None:
        if not self.vote.selecting(rnd) and self.params.body_mode == "relay":
            self.relay_body = flatten(update.arrays, self.body_keys)

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> dict[str, Any]:
        done = list(updates)
        for c in done:
            self.sizes[c] = max(updates[c].num_samples, 1)
        facts: dict[str, Any] = {}
        if self.vote.selecting(rnd):
            candidate_keys = self.vote.candidate_keys()
            for c in done:
                arrays = updates[c].arrays
                self.bodies[c] = flatten(arrays, self.trainable)
                self.body_round[c] = rnd
                self.sent[c] = flatten(self.global_arrays, self.trainable)
                # Phase-1 devices trained from the global model: their update is trained - global.
                self.deltas[c] = {k: arrays[k] - self.global_arrays[k] for k in candidate_keys if k in arrays}
            facts["round_layer"] = self.vote.record(updates)
            super().aggregate(rnd, updates)  # FedAvg of the trainable entries
            return facts
        for c in done:
            arrays = updates[c].arrays
            self.bodies[c] = flatten(arrays, self.body_keys)
            self.body_round[c] = rnd
            self.deltas[c] = {k[len(DELTA) :]: v for k, v in arrays.items() if k.startswith(DELTA)}
        self._update_similarity()
        facts.update(self.diagnostics)
        self.diagnostics = {}
        if self.params.server_momentum and self.params.body_mode == "weighted" and done:
            self._momentum(done)
        self._round_bodies = {}
        if self.relay_body is not None:
            self.global_arrays.update(unflatten(self.relay_body, self.global_arrays, self.body_keys))
        return facts

    # ----------------------------------------------------------------------------------- selection
    def _finish_selection(self) -> None:
        self.personal_keys, self.body_keys = self.vote.choose()
        # Stored phase-1 models become bodies; their chosen-layer updates seed the similarities.
        for store in (self.bodies, self.sent):
            for c in list(store):
                store[c] = self._body_from_full(store[c])
        self.relay_body = flatten(self.global_arrays, self.body_keys)
        self._update_similarity()

    def _momentum(self, done: Sequence[int]) -> None:
        """FedAvgM on the mixed update: v_t = beta v_(t-1) + mean_j (theta_j - start_j); the next round's
        bodies get server_lr * beta * v_(t-1) on top of their own (accelerated) mixed update."""
        beta, lr = self.params.server_momentum, self.params.server_lr
        step = np.mean([self.bodies[c] - self.sent[c] for c in done if c in self.sent], axis=0)
        previous = self.velocity
        previous = np.zeros_like(step) if previous is None else previous
        self.push = lr * beta * previous
        self.velocity = beta * previous + step

    def _body_from_full(self, full: np.ndarray) -> np.ndarray:
        arrays = unflatten(full, self.global_arrays, self.trainable)
        return flatten(arrays, self.body_keys)

    # ----------------------------------------------------------------------------------- weighting
    def _update_similarity(self) -> None:
        """s_ij among all clients holding a personal-layer update; NaN where never compared."""
        held = [c for c in sorted(self.deltas) if self._head(c) is not None]
        self.sim_clients, self._sim_pos = held, None
        self.sim = np.zeros((0, 0))
        if held:
            s = kernels.rowwise_mean_cosine_matrix(np.stack([self._head(c) for c in held]))
            self.sim = np.maximum(0.0, s)

    def _similarities(self, rows: Sequence[int], cols: Sequence[int]) -> np.ndarray:
        """s_ij for rows x cols (client ids), NaN for pairs never compared: the entries of the n x n matrix
        the similarity once was, without holding it."""
        assert self.sim is not None
        if self.sim_clients is None:
            return self.sim[np.ix_(list(rows), list(cols))]
        if self._sim_pos is None or self._sim_pos[0] is not self.sim_clients:  # restored or recomputed since
            self._sim_pos = (self.sim_clients, {c: i for i, c in enumerate(self.sim_clients)})
        pos = self._sim_pos[1]
        out = np.full((len(rows), len(cols)), np.nan)
        r_at = [(r, pos[c]) for r, c in enumerate(rows) if c in pos]
        c_at = [(k, pos[c]) for k, c in enumerate(cols) if c in pos]
        if r_at and c_at:
            out[np.ix_([a for a, _ in r_at], [a for a, _ in c_at])] = self.sim[
                np.ix_([b for _, b in r_at], [b for _, b in c_at])
            ]
        return out

    def _head(self, cid: int) -> np.ndarray | None:
        """dW_i as rows [out, in (+1 for the bias)]."""
        delta = self.deltas.get(cid, {})
        if not self.personal_keys or any(k not in delta for k in self.personal_keys):
            return None
        weight = next((k for k in self.personal_keys if k.endswith("weight")), self.personal_keys[0])
        w = np.asarray(delta[weight], dtype=np.float64)
        rows = w.reshape(w.shape[0], -1)
        bias = weight[: -len("weight")] + "bias"
        if bias in delta:
            rows = np.concatenate([rows, np.asarray(delta[bias], dtype=np.float64).reshape(-1, 1)], axis=1)
        return rows

    def _weighted_bodies(self, cids: Sequence[int], diag: dict[str, float] | None = None, rnd: int = 0) -> np.ndarray:
        """The mixed bodies for ``cids``; ``diag`` (if given) gets the round's mixing diagnostics: mean
        staleness of the mixed bodies (1 = trained last round), effective number of bodies 1 / sum_j w_ij^2
        and the spread (std) of the similarities used, each averaged over the devices."""
        held = sorted(self.bodies)
        if self.params.max_staleness and held:
            newest = max(self.body_round[c] for c in held)
            held = [c for c in held if newest - self.body_round[c] < self.params.max_staleness]
        if not held:
            start = flatten(self.global_arrays, self.body_keys)
            return np.stack([start for _ in cids])
        p = self.params
        if self.sim is None:
            self._update_similarity()
        assert self.sim is not None
        s = self._similarities(cids, held)
        s = np.where(np.isnan(s), p.unknown_similarity, s)
        phi = np.exp(s / p.tau)
        if p.size_weighting:
            phi = phi * np.asarray([self.sizes.get(j, 1) for j in held], dtype=np.float64)[None, :]
        for r, c in enumerate(cids):
            if p.top_k and p.top_k < len(held):
                cut = np.sort(phi[r])[-p.top_k]
                phi[r] = np.where(phi[r] >= cut, phi[r], 0.0)
            if p.self_weight and c in held:
                phi[r, held.index(c)] += p.self_weight * phi[r].sum()
        phi = phi / phi.sum(axis=1, keepdims=True)
        if diag is not None:
            age = np.asarray([rnd - self.body_round[j] for j in held], dtype=np.float64)
            diag["mixed_bodies"] = float(len(held))
            diag["staleness"] = float((phi @ age).mean())
            diag["effective_bodies"] = float((1.0 / (phi**2).sum(axis=1)).mean())
            diag["similarity_std"] = float(s.std(axis=1).mean())
        mixed = kernels.weighted_aggregate(phi, [self.bodies[j] for j in held])
        if p.server_lr != 1.0:
            # Step further along the mixed update: body + lr * sum_j Phi_ij (theta_j - start_j).
            steps = kernels.weighted_aggregate(phi, [self.bodies[j] - self.sent[j] for j in held])
            mixed = mixed + (p.server_lr - 1.0) * steps
        push = self.push
        if p.server_momentum and push is not None:
            mixed = mixed + push[None, :]
        return mixed

    def summary(self) -> dict[str, Any]:
        return {
            **self.vote.summary(),
            "client_votes": {str(c): v for c, v in sorted(self.vote.client_votes.items())},
            "body_mode": self.params.body_mode,
            "variant": self.params.variant,
        }


class FedCMDClient(ClientStrategy):
    def __init__(self, params: FedCMDParams, ctx: Any) -> None:
        super().__init__(params, ctx)
        self.params: FedCMDParams = params
        self.votes: Counter[str] = Counter()
        self.num_classes = 0

    def batch_hook(self, task: Task):
        candidates: list[str] | None = task.config.get("vote")
        if not candidates:
            return None
        names = [n for n, _ in self.ctx.model.named_children()]
        index = [names.index(c) for c in candidates]
        num_classes = int(self.ctx.spec.initial[_classifier_weight(self.ctx.spec.initial)].shape[0])
        metric, embedding = self.params.selection_metric, self.params.embedding

        def hook(x: torch.Tensor, y: torch.Tensor, outputs: list[torch.Tensor]) -> None:
            onehot = torch.nn.functional.one_hot(y, num_classes).to(x.dtype)
            d = layer_distances(x, onehot, outputs, index, metric, embedding)
            self.votes[candidates[int(np.argmin(d))]] += 1

        return hook

    def local_train(self, task: Task, generator: torch.Generator) -> None:
        self.votes = Counter()
        personal = task.config.get("personal", [])
        before = model_arrays(self.ctx.model, personal) if personal else {}
        task.config.setdefault("hook_every", self.params.vote_every)
        super().local_train(task, generator)
        self._personal_before = before

    def upload(self, task: Task, received: Arrays) -> tuple[Arrays, dict[str, Any]]:
        arrays, info = super().upload(task, received)
        before = getattr(self, "_personal_before", {})
        after = model_arrays(self.ctx.model, list(before))
        # Only the update of the personal layer leaves the device, never the layer itself.
        arrays.update({DELTA + k: after[k] - before[k] for k in before})
        if task.config.get("vote"):
            info["votes"] = dict(self.votes)
        return arrays, info


def _classifier_weight(initial: Arrays) -> str:
    keys = [k for k in initial if k.endswith("weight") and np.asarray(initial[k]).ndim == 2]
    return keys[-1]


ALGORITHM = Algorithm("fedcmd", FedCMDParams, FedCMDServer, FedCMDClient)
