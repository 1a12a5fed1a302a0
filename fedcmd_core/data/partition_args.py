"""The partition arguments (the seed's generate_data.py names and defaults) and their range checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .dataset import Dataset
from .errors import DataError


@dataclass
class PartitionArgs:
    """The seed's generate_data.py arguments (same names and defaults)."""

    client_num: int = 20
    iid: bool = False
    alpha: float = 0.0
    classes: int = 0
    shards: int = 0
    least_samples: int = 40  # Dirichlet only: redraw until every client has this many samples
    split: Literal["sample", "user"] = "sample"
    fraction: float = 0.5
    seed: int = 42
    max_redraws: int = 10000  # the reference loops forever; the shared s44 partition needs 3,778 draws
    # FL-bench's semantic scheme (-sm); our only feature extractor is PCA of the pixels (no weights offline).
    semantic: bool = False
    semantic_features: str = "pca"
    pca_components: int = 32  # FL-bench: 256 EfficientNet dims; fewer for raw pixels and ~100 samples/cluster
    gmm_max_iter: int = 100
    gmm_init_params: str = "kmeans"

    def scheme(self, natural: bool = False) -> str:
        if self.iid:
            return "iid"
        if self.alpha > 0:
            return "dirichlet"
        if self.classes > 0:
            return "classes"
        if self.shards > 0:
            return "shards"
        if self.semantic:
            return "semantic"
        if natural:
            return "natural"
        raise DataError("choose a partition scheme: --iid, --alpha A (Dirichlet), --classes C, --shards S or "
                        "--semantic")

    def scheme_tag(self, natural: bool = False) -> str:
        """Short name for file names, e.g. ``dir0.1``, ``iid``, ``classes2``."""
        scheme = self.scheme(natural)
        return {"dirichlet": f"dir{self.alpha:g}", "classes": f"classes{self.classes}",
                "shards": f"shards{self.shards}"}.get(scheme, scheme)

    def validate(self, dataset: Dataset) -> str:
        """Check the ranges against ``dataset``; return the chosen scheme."""
        n = len(dataset)
        if self.client_num < 1 or self.client_num > n:
            raise DataError(f"client_num must be between 1 and the dataset size {n} (got {self.client_num})")
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise DataError(f"alpha must be >= 0, e.g. --alpha 0.1 for strong label skew (got {self.alpha})")
        if self.split not in ("sample", "user"):
            raise DataError(f"split must be 'sample' or 'user' (got {self.split!r})")
        if not 0 < self.fraction < 1:
            raise DataError(f"fraction must be strictly between 0 and 1, e.g. --fraction 0.5 "
                            f"(got {self.fraction})")
        if self.classes < 0 or self.classes > dataset.num_classes:
            raise DataError(f"classes must be between 0 and {dataset.num_classes}, the number of classes of "
                            f"{dataset.name} (got {self.classes})")
        if self.shards < 0 or self.shards * self.client_num > n:
            raise DataError(f"shards must be >= 0 and client_num * shards <= {n} samples (got {self.shards} "
                            f"shards x {self.client_num} clients)")
        if self.least_samples < 0:
            raise DataError(f"least_samples must be >= 0 (got {self.least_samples})")
        if self.max_redraws < 1:
            raise DataError(f"max_redraws must be >= 1 (got {self.max_redraws})")
        if self.split == "user" and not 1 <= int(self.client_num * self.fraction) < self.client_num:
            raise DataError(f"split=user needs at least one training and one test client: int(client_num * "
                            f"fraction) = {int(self.client_num * self.fraction)} of {self.client_num}")
        scheme = self.scheme(dataset.natural_partition is not None)
        if scheme == "dirichlet" and self.client_num * self.least_samples > n:
            raise DataError(
                f"{self.client_num} clients x least_samples {self.least_samples} exceeds the {n} samples of "
                f"{dataset.name}; use --least_samples {n // self.client_num} or less, or fewer clients"
            )
        return scheme  # partition.py adds the natural and semantic schemes' own checks
