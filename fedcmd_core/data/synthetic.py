"""FedProx's Synthetic(gamma, beta) data, generated per client (FL-bench's variant of it).

Client i draws its own linear softmax model W_i ~ N(u_i, 1), b_i ~ N(u_i, 1) with u_i ~ N(0, gamma), and its
own inputs x ~ N(v_i, diag(j^-1.2)) with v_i ~ N(B_i, 1), B_i ~ N(0, beta); labels are argmax(x W_i + b_i).
gamma controls how different the clients' models are, beta how different their inputs are. Sample counts
per client are lognormal(4, 2) + 50, as in FedProx. ``iid=True`` gives every client the same model and
zero-centred inputs (FedProx's Synthetic-IID). The random calls follow FL-bench's order on a
``RandomState(seed)``, so a seed gives the same data as the reference. Inputs are left unnormalised, as in
FedProx: they are already of order one.
"""

from __future__ import annotations

import numpy as np
import torch

from .dataset import Dataset
from .errors import DataError


def make_synthetic(
    gamma: float = 0.5,
    beta: float = 0.5,
    dimension: int = 60,
    client_num: int = 20,
    classes: int = 10,
    seed: int = 42,
    iid: bool = False,
) -> Dataset:
    """Generate Synthetic(gamma, beta); ``natural_partition`` holds each client's sample indices."""
    if gamma < 0 or beta < 0:
        raise DataError(f"synthetic needs gamma >= 0 and beta >= 0 (got {gamma}, {beta}); "
                        f"try --gamma 0.5 --beta 0.5")
    if dimension < 1 or client_num < 1 or classes < 2:
        raise DataError(
            f"synthetic needs dimension >= 1, client_num >= 1 and classes >= 2 "
            f"(got {dimension}, {client_num}, {classes})"
        )
    rng = np.random.RandomState(seed)
    samples = rng.lognormal(4, 2, client_num).astype(int) + 50
    mean_w = rng.normal(0, gamma, client_num)
    mean_b = mean_w
    shift = rng.normal(0, beta, client_num)
    cov_x = np.diag(np.power(np.arange(1, dimension + 1, dtype=np.float64), -1.2))
    mean_x = np.zeros((client_num, dimension))
    for i in range(client_num):
        mean_x[i] = np.ones(dimension) * shift[i] if iid else rng.normal(shift[i], 1, dimension)
    if iid:
        w_global = rng.normal(0, 1, (dimension, classes))
        b_global = rng.normal(0, 1, classes)

    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    parts: list[np.ndarray] = []
    start = 0
    for i in range(client_num):
        # Drawn even for iid so the random stream matches the reference.
        w = rng.normal(mean_w[i], 1, (dimension, classes))
        b = rng.normal(mean_b[i], 1, classes)
        if iid:
            w, b = w_global, b_global
        x = rng.multivariate_normal(mean_x[i], cov_x, int(samples[i]))
        # argmax of the logits is argmax of their softmax, without its overflow.
        ys.append(np.argmax(x @ w + b, axis=1).astype(np.int64))
        xs.append(x)
        parts.append(np.arange(start, start + len(x), dtype=np.int64))
        start += len(x)

    x_all = torch.from_numpy(np.concatenate(xs).astype(np.float32))
    y_all = torch.from_numpy(np.concatenate(ys))
    options = {
        "gamma": gamma, "beta": beta, "dimension": dimension, "client_num": client_num,
        "classes": classes, "seed": seed, "iid": iid,
    }
    return Dataset("synthetic", x_all, y_all, classes, natural_partition=parts, options=options)
