"""The in-memory dataset every loader returns and every partitioner reads (its own module, so loaders and
partitioners depend on it and not on each other)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported by the loaders that build tensors, not by the CLI's first import
    import torch


@dataclass
class Dataset:
    """All samples of one dataset in memory, in a fixed order that partition indices refer to."""

    name: str
    x: torch.Tensor  # float32, normalised, [N, C, H, W] for images or [N, D] for vectors
    y: torch.Tensor  # int64 [N]
    num_classes: int
    natural_partition: list[np.ndarray] | None = None  # per-client indices when the set comes split by user
    # What a natural part is: "client" (generated for exactly that many clients: synthetic), "user" (a writer
    # or celebrity: the partition picks client_num of them) or "domain" (split among client_num / domains).
    natural_unit: str = "client"
    natural_names: list[str] | None = None  # the users' or domains' own ids, recorded in partitions
    options: dict[str, Any] = field(default_factory=dict)  # load options, so a saved partition can reload it

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def labels(self) -> np.ndarray:
        """Labels as an int64 NumPy array (what partitioners work on)."""
        return self.y.numpy().astype(np.int64, copy=False)
