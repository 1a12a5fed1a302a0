"""FedCMD's personal-layer vote (DESIGN.md §2, phase 1).

On a batch, every candidate layer l gets a distance
    d_l = W( z(o_l) - z(o_{l-1}),  z(y) - z(x) )
between two 1-D empirical distributions over the batch, where z embeds each sample's tensor into
one number. The device votes for argmin_l d_l. Votes are tallied per client, per round, then over
rounds, always breaking ties towards the layer nearest the output (the conventional personal head).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from fedcmd_core import kernels

SelectionMetric = Literal["w1", "gaussian_w2", "reference"]
Embedding = Literal["minmax_mean", "random_projection"]


def embed(t: torch.Tensor, how: Embedding = "minmax_mean", seed: int = 0) -> torch.Tensor:
    """One value per sample: the mean of the sample's min-max normalised activations, or a fixed
    random unit projection of them."""
    # float32 is plenty for a per-sample summary and twice as fast as float64 on every batch.
    flat = t.reshape(t.shape[0], -1).to(torch.float32)
    if how == "random_projection":
        gen = torch.Generator().manual_seed(seed + flat.shape[1])
        r = torch.randn(flat.shape[1], generator=gen, dtype=torch.float32)
        return (flat @ (r / r.norm())).to(torch.float64)
    lo, hi = torch.aminmax(flat, dim=1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).mean(dim=1).to(torch.float64)


def _minmax_mean_whole(t: torch.Tensor) -> float:
    t = t.to(torch.float64)
    span = float(t.max() - t.min())
    return float(((t - t.min()) / max(span, 1e-12)).mean())


def layer_distances(
    x: torch.Tensor,
    y_onehot: torch.Tensor,
    outputs: Sequence[torch.Tensor],
    candidates: Sequence[int],
    metric: SelectionMetric = "w1",
    embedding: Embedding = "minmax_mean",
) -> np.ndarray:
    """d_l for each candidate layer index (into ``outputs``); lower means "this layer carries the
    client's own input->label shift" and should be personal."""
    if metric == "reference":
        # The released code: |mean| differences of whole-batch min-max normalised tensors.
        target = _minmax_mean_whole(y_onehot) - _minmax_mean_whole(x)
        prev = [x, *outputs]
        return np.array(
            [abs(_minmax_mean_whole(outputs[i]) - _minmax_mean_whole(prev[i]) - target) for i in candidates]
        )
    # Embed only what the candidates need: each candidate's output and its input (index -1 is x).
    needed = sorted({i for i in candidates} | {i - 1 for i in candidates} | {-1})
    z = {i: embed(x if i < 0 else outputs[i], embedding) for i in needed}
    target = (embed(y_onehot, embedding) - z[-1]).numpy()
    shifts = np.stack([(z[i] - z[i - 1]).numpy() for i in candidates])
    if metric == "gaussian_w2":
        # W2 between fitted normals: sqrt((mu_a - mu_b)^2 + (sigma_a - sigma_b)^2).
        mu, sd = shifts.mean(axis=1), shifts.std(axis=1)
        return np.sqrt((mu - target.mean()) ** 2 + (sd - target.std()) ** 2)
    return np.asarray(kernels.wasserstein_1d(shifts, np.broadcast_to(target, shifts.shape)))


def mode(counts: Mapping[str, int], order: Sequence[str]) -> str | None:
    """The most voted layer; ties go to the layer nearest the output (latest in ``order``)."""
    best: str | None = None
    for name in order:  # later layers win ties because >= replaces the earlier best
        if counts.get(name, 0) > 0 and (best is None or counts[name] >= counts[best]):
            best = name
    return best


def round_mode(client_votes: Sequence[Mapping[str, int]], order: Sequence[str]) -> str | None:
    """The round's layer: the mode over clients of each client's own mode."""
    per_client = [m for m in (mode(v, order) for v in client_votes) if m is not None]
    return mode(Counter(per_client), order)
