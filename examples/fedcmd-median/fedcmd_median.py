"""Median FedAvg: the cloud sets every entry of the model to the coordinate-wise median of the round's
uploads (robust to a minority of wild updates); devices run plain local SGD. A complete fedcmd algorithm."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import Field

from fedcmd_core.strategies import Algorithm, ClientStrategy, HyperParams, ServerStrategy, Update


class MedianParams(HyperParams):
    """Hyper-parameters: `--hp min_updates=3` on the command line, `[median_fedavg]` in a TOML config."""

    min_updates: int = Field(1, ge=1, description="rounds with fewer accepted updates keep the model")


class MedianServer(ServerStrategy):
    """Cloud side. The coordinator sends every device `global_arrays` (the base class's configure_fit) and
    calls aggregate with the round's validated updates; checkpoints carry the base state (global_arrays)."""

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> dict[str, Any]:
        if len(updates) < self.params.min_updates:
            return {"aggregated": False}
        for key in next(iter(updates.values())).arrays:
            stacked = np.stack([u.arrays[key] for u in updates.values()])
            self.global_arrays[key] = np.median(stacked, axis=0).astype(self.global_arrays[key].dtype)
        return {"median_of": len(updates)}


class MedianClient(ClientStrategy):
    """Device side: the base class's local SGD, evaluation and upload of what it was sent."""


ALGORITHM = Algorithm("median_fedavg", MedianParams, MedianServer, MedianClient)
