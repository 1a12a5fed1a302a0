"""FL-bench's semantic partition: clients hold feature-space clusters of every class.

1. Embed every sample. FL-bench uses a pretrained EfficientNet; with no weights offline the only extractor
   here is ``pca``: the flattened, normalised pixels reduced by PCA (fitted on at most 20,000 samples) to
   ``pca_components`` dimensions.
2. Per class, fit a Gaussian mixture (full covariances, reg_covar 1e-4, as FL-bench) with one component
   per client on at most 10,000 of its samples, then assign *every* sample of the class to its most likely
   component (FL-bench predicts only the fitted subsample).
3. Match components across classes: classes in a seeded random order, each one matched to the last fully
   matched class by the Hungarian method on the KL divergence between their Gaussians, so a client collects
   components that look alike in every class. A class with fewer samples than clients gets fewer
   components, each matched to a distinct client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .dataset import Dataset
from .errors import DataError

if TYPE_CHECKING:
    from .partition_args import PartitionArgs

FEATURES = ("pca",)
GMM_INITS = ("kmeans", "k-means++", "random", "random_from_data")
PCA_FIT_SAMPLES = 20_000
GMM_FIT_SAMPLES = 10_000  # per class, as FL-bench
_CHUNK = 8192


def validate_semantic(args: PartitionArgs) -> None:
    if args.semantic_features not in FEATURES:
        raise DataError(f"semantic features {args.semantic_features!r} are not available: pretrained extractors "
                        f"need weights we cannot download offline; use --semantic-features pca")
    if args.pca_components < 1:
        raise DataError(f"pca_components must be >= 1 (got {args.pca_components})")
    if args.gmm_max_iter < 1:
        raise DataError(f"gmm_max_iter must be >= 1 (got {args.gmm_max_iter})")
    if args.gmm_init_params not in GMM_INITS:
        raise DataError(f"gmm_init_params must be one of {', '.join(GMM_INITS)} (got {args.gmm_init_params!r})")


def pca_features(dataset: Dataset, components: int, seed: int, rng: np.random.RandomState) -> np.ndarray:
    """[N, d] float64 PCA coordinates of the flattened inputs, d = min(components, inputs, fitted samples)."""
    from sklearn.decomposition import PCA

    flat = dataset.x.reshape(len(dataset), -1).numpy()
    n = len(flat)
    fit_rows = np.sort(rng.choice(n, PCA_FIT_SAMPLES, replace=False)) if n > PCA_FIT_SAMPLES else np.arange(n)
    d = min(components, flat.shape[1], len(fit_rows))
    pca = PCA(n_components=d, random_state=seed).fit(flat[fit_rows])  # float32: half the memory of float64
    out = np.empty((n, d), dtype=np.float64)  # the mixtures are fitted in float64
    for i in range(0, n, _CHUNK):
        out[i:i + _CHUNK] = pca.transform(flat[i:i + _CHUNK])
    return out


def gaussian_kl(m0: np.ndarray, s0: np.ndarray, m1: np.ndarray, s1: np.ndarray) -> np.ndarray:
    """KL(N(m0_i, s0_i) || N(m1_j, s1_j)) for every pair: [len(m0), len(m1)]."""
    d = m0.shape[1]
    inv1 = np.linalg.inv(s1)
    logdet0 = np.linalg.slogdet(s0)[1]
    logdet1 = np.linalg.slogdet(s1)[1]
    trace = np.einsum("jab,iba->ij", inv1, s0)
    diff = m1[None, :, :] - m0[:, None, :]
    maha = np.einsum("ija,jab,ijb->ij", diff, inv1, diff, optimize=True)
    return 0.5 * (trace + maha - d + logdet1[None, :] - logdet0[:, None])


def semantic_clients(dataset: Dataset, args: PartitionArgs, rng: np.random.RandomState,
                     extra: dict[str, Any]) -> list[np.ndarray]:
    """Each client's sample indices under the semantic scheme (``validate_semantic`` passed)."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.mixture import GaussianMixture

    n_clients = args.client_num
    labels = dataset.labels
    emb = pca_features(dataset, args.pca_components, args.seed, rng)
    classes = np.unique(labels)
    members: dict[int, list[np.ndarray]] = {}
    gaussians: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for k in classes.tolist():
        idx = np.flatnonzero(labels == k)
        fit = np.sort(rng.choice(len(idx), GMM_FIT_SAMPLES, replace=False)) if len(idx) > GMM_FIT_SAMPLES \
            else np.arange(len(idx))
        gmm = GaussianMixture(n_components=min(n_clients, len(idx)), covariance_type="full", reg_covar=1e-4,
                              max_iter=args.gmm_max_iter, init_params=args.gmm_init_params,
                              random_state=args.seed)
        gmm.fit(emb[idx[fit]])
        component = gmm.predict(emb[idx])
        members[k] = [idx[component == c] for c in range(gmm.n_components)]
        gaussians[k] = (gmm.means_, gmm.covariances_)
    full = [k for k in classes.tolist() if len(members[k]) == n_clients]
    if not full:
        raise DataError(f"semantic partition: no class has {n_clients} samples, one per client; "
                        f"use fewer clients (largest class: {max(len(m) for m in members.values())})")
    order = [int(k) for k in rng.permutation(classes)]
    anchor = next(k for k in order if k in full)
    client_of: dict[int, np.ndarray] = {anchor: np.arange(n_clients)}
    latest = anchor
    for k in order:
        if k == anchor:
            continue
        cost = gaussian_kl(*gaussians[latest], *gaussians[k])
        rows, cols = linear_sum_assignment(cost)
        client_of[k] = np.empty(len(members[k]), dtype=np.int64)
        client_of[k][cols] = client_of[latest][rows]
        if len(members[k]) == n_clients:
            latest = k
    pieces: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for k in order:
        for c, piece in enumerate(members[k]):
            pieces[client_of[k][c]].append(piece)
    extra["semantic"] = {"features": args.semantic_features, "pca_dims": int(emb.shape[1]),
                         "class_order": order}
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in pieces]
