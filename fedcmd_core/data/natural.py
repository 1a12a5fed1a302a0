"""The natural partition of a dataset that comes split by client, user or domain (``Dataset.natural_unit``).

- ``client`` (synthetic): the data was generated for exactly ``client_num`` clients; each keeps its own part.
- ``user`` (FEMNIST writers, CelebA celebrities): clients are users. Users with fewer than ``least_samples``
  samples are dropped (LEAF's ``-k``), then ``client_num`` of the rest are drawn with the partition's seeded
  RNG and kept in dataset order, each one client holding all of that user's samples.
- ``domain`` (DomainNet): every domain is shuffled and cut into ``client_num / domains`` equal clients
  (FL-bench's "clients per domain"), so each client holds samples of exactly one domain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .dataset import Dataset
from .errors import DataError

if TYPE_CHECKING:
    from .partition_args import PartitionArgs

UNITS = ("client", "user", "domain")


def _parts(dataset: Dataset) -> list[np.ndarray]:
    # Copies: the train/test split shuffles client arrays in place, and the dataset's parts must not move.
    return [np.array(p, dtype=np.int64) for p in dataset.natural_partition or []]


def validate_natural(dataset: Dataset, args: PartitionArgs) -> None:
    """Raise DataError unless ``args.client_num`` clients can be made from the natural parts."""
    parts = _parts(dataset)
    unit = dataset.natural_unit
    if unit not in UNITS:
        raise DataError(f"{dataset.name}: unknown natural unit {unit!r} (one of {', '.join(UNITS)})")
    if unit == "client" and args.client_num != len(parts):
        raise DataError(f"{dataset.name} was generated for {len(parts)} clients, not {args.client_num}; "
                        f"generate it with client_num={args.client_num} or pass --client_num {len(parts)}")
    if unit == "user":
        eligible = sum(len(p) >= args.least_samples for p in parts)
        if args.client_num > eligible:
            raise DataError(
                f"{dataset.name} has {eligible} users with >= {args.least_samples} samples ({len(parts)} in all); "
                f"pass --client_num {eligible} or less, or a lower --least_samples"
            )
    if unit == "domain":
        if args.client_num % len(parts):
            raise DataError(f"{dataset.name} has {len(parts)} domains: --client_num must be a multiple of "
                            f"{len(parts)} (each domain is split among client_num / {len(parts)} clients)")
        per = args.client_num // len(parts)
        smallest = min(len(p) for p in parts) // per
        if smallest < args.least_samples:
            raise DataError(f"{dataset.name}: with {per} clients per domain the smallest client gets {smallest} "
                            f"samples, below least_samples {args.least_samples}; use fewer clients or a lower "
                            f"--least_samples")


def natural_clients(dataset: Dataset, args: PartitionArgs, rng: np.random.RandomState,
                    extra: dict[str, Any]) -> list[np.ndarray]:
    """Each client's sample indices under the natural partition (``validate_natural`` passed)."""
    parts = _parts(dataset)
    names = dataset.natural_names
    if dataset.natural_unit == "client":
        return parts
    if dataset.natural_unit == "user":
        eligible = np.flatnonzero([len(p) >= args.least_samples for p in parts])
        chosen = np.sort(rng.choice(eligible, args.client_num, replace=False))
        if names is not None:
            extra["natural_users"] = [names[i] for i in chosen]
        return [parts[i] for i in chosen]
    per = args.client_num // len(parts)
    clients: list[np.ndarray] = []
    domains: list[str] = []
    for d, part in enumerate(parts):
        order = part[rng.permutation(len(part))]
        clients += [np.sort(piece) for piece in np.array_split(order, per)]
        domains += [names[d] if names is not None else str(d)] * per
    extra["client_domains"] = domains
    return clients
