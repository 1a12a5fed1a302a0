"""Split a Dataset among clients (the seed's generate_data.py schemes) and store the split as npz.

Schemes, first one chosen wins: ``iid``; ``alpha > 0`` Dirichlet label skew; ``classes > 0`` labels per
client; ``shards > 0`` sorted-label shards per client; ``semantic`` feature-space clusters of every class
(semantic.py); else a dataset's natural split by client, user or domain (natural.py). All randomness comes
from one ``np.random.RandomState(seed)`` used in the reference code's call order, so the Dirichlet scheme
reproduces the reference's partitions index for index.

Within each client, ``split="sample"`` shuffles its indices and keeps the first ``int(n * fraction)`` for
training and the rest for testing. ``split="user"`` instead makes ``int(client_num * fraction)`` clients,
chosen by a seeded shuffle of the client ids (ids are not renumbered), training-only clients that hold all
their data as train, and the other clients test-only; ``meta["train_clients"]`` lists the former.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcmd_core.atomic import atomic_write

from .dataset import Dataset
from .datasets import DATASET_NAMES
from .errors import DataError
from .natural import natural_clients, validate_natural
from .partition_args import PartitionArgs
from .semantic import semantic_clients, validate_semantic

FORMAT = "fedcmd.partition/1"
_KEY = re.compile(r"^(train|test)_(\d+)$")


@dataclass
class Partition:
    """Per-client train/test indices into one Dataset, plus JSON-able metadata."""

    train: list[np.ndarray]
    test: list[np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    label_histogram: np.ndarray | None = None  # [clients, classes], filled by make_partition and load

    @property
    def num_clients(self) -> int:
        return len(self.train)

    def histogram(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """Label counts per client over its train and test samples, shape [clients, classes]."""
        labels = np.asarray(labels)
        rows = [np.bincount(labels[np.concatenate((tr, te))], minlength=num_classes)[:num_classes]
                for tr, te in zip(self.train, self.test, strict=True)]
        return np.stack(rows).astype(np.int64) if rows else np.zeros((0, num_classes), np.int64)

    def save(self, path: str | Path) -> None:
        """Write an npz (train_<c>, test_<c>, num_clients, meta as JSON, histogram) atomically."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {"num_clients": np.asarray(self.num_clients, dtype=np.int64),
                                         "meta": np.asarray(json.dumps(self.meta, sort_keys=True))}
        for c, (tr, te) in enumerate(zip(self.train, self.test, strict=True)):
            arrays[f"train_{c}"] = np.asarray(tr, dtype=np.int64)
            arrays[f"test_{c}"] = np.asarray(te, dtype=np.int64)
        if self.label_histogram is not None:
            arrays["histogram"] = np.asarray(self.label_histogram, dtype=np.int64)
        atomic_write(path, lambda f: np.savez_compressed(f, **arrays), make_parents=True)

    @classmethod
    def load(cls, path: str | Path, dataset: Dataset | None = None) -> Partition:
        """Read our npz or an external one of train_<c>/test_<c>; check it against ``dataset`` if given."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"partition file {path} not found; make one with `fedcmd data partition`")
        try:
            npz = np.load(path, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):  # a plain .npy loads as one array
                raise DataError(f"{path} is not an npz archive with train_<c>/test_<c> arrays")
            with npz:
                files = {k: npz[k] for k in npz.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{path} is not a readable npz partition ({type(e).__name__}: {e})") from e
        part = cls(*_clients_from(files, path), meta=_meta_from(files, path))
        if "histogram" in files:
            part.label_histogram = np.asarray(files["histogram"], dtype=np.int64)
        if dataset is not None:
            part.check(dataset, source=str(path))
        return part

    def dataset_options(self, name: str) -> dict[str, Any]:
        """The loader options this partition was made with (e.g. CelebA's max_users), when made for ``name``:
        loading the dataset with other options would index a different sample list."""
        if self.meta.get("dataset") != name.strip().lower():
            return {}
        return dict(self.meta.get("dataset_options") or {})

    def check(self, dataset: Dataset, source: str = "this partition") -> None:
        """Raise DataError unless the partition fits ``dataset`` (its name if recorded, index range)."""
        made_for = self.meta.get("dataset")
        if made_for in DATASET_NAMES and made_for != dataset.name:
            raise DataError(
                f"partition {source} was made for dataset {made_for}, not {dataset.name}; "
                f"pass -d {made_for} or make a new one with `fedcmd data partition -d {dataset.name}`"
            )
        size = self.meta.get("dataset_size") if self.meta.get("format") == FORMAT else None
        if size is not None and size != len(dataset):
            raise DataError(f"partition {source} was made for {made_for} with {size} samples, this one has "
                            f"{len(dataset)} (other options?); make a new partition")
        top = max((int(a.max()) for a in (*self.train, *self.test) if a.size), default=-1)
        if top >= len(dataset):
            raise DataError(f"partition {source} uses sample {top} but {dataset.name} has only "
                            f"{len(dataset)} samples; it was made for another dataset")
        self.label_histogram = self.histogram(dataset.labels, dataset.num_classes)


def _clients_from(files: dict[str, np.ndarray], path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    found: dict[str, dict[int, np.ndarray]] = {"train": {}, "test": {}}
    for key, arr in files.items():
        m = _KEY.match(key)
        if m is None:
            continue
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise DataError(f"{path}: {key} must be a 1-D integer index array (got {arr.dtype} {arr.shape})")
        if arr.size and int(arr.min()) < 0:
            raise DataError(f"{path}: {key} holds negative indices")
        found[m.group(1)][int(m.group(2))] = arr.astype(np.int64)
    n = len(found["train"])
    if n == 0:
        raise DataError(f"{path} holds no train_<c>/test_<c> arrays; it is not a partition file")
    for kind in ("train", "test"):
        if sorted(found[kind]) != list(range(n)):
            missing = sorted(set(range(n)) - set(found[kind]) or set(found[kind]) - set(range(n)))
            raise DataError(f"{path}: clients must be numbered 0..{n - 1} with both train_<c> and test_<c>; "
                            f"{kind}_{missing[0]} is missing or extra")
    if "num_clients" in files and int(files["num_clients"]) != n:
        raise DataError(f"{path}: num_clients says {int(files['num_clients'])} but {n} clients are stored")
    return [found["train"][c] for c in range(n)], [found["test"][c] for c in range(n)]


def _meta_from(files: dict[str, np.ndarray], path: Path) -> dict[str, Any]:
    if "meta" not in files:
        return {"scheme": "external", "source": path.name}
    try:
        meta = json.loads(str(files["meta"]))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: meta is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise DataError(f"{path}: meta must be a JSON object")
    return meta


def make_partition(dataset: Dataset, args: PartitionArgs) -> Partition:
    """Split ``dataset`` among ``args.client_num`` clients; see the module docstring for the schemes."""
    scheme = args.validate(dataset)
    if scheme == "natural":
        validate_natural(dataset, args)
    if scheme == "semantic":
        validate_semantic(args)
    labels = dataset.labels
    rng = np.random.RandomState(args.seed)
    extra: dict[str, Any] = {}
    if scheme == "iid":
        clients = np.array_split(rng.permutation(len(labels)).astype(np.int64), args.client_num)
    elif scheme == "dirichlet":
        clients, extra["dirichlet_draws"] = _dirichlet(labels, args, rng)
    elif scheme == "classes":
        clients = _by_classes(labels, args.client_num, args.classes, rng)
    elif scheme == "shards":
        clients = _by_shards(labels, args.client_num, args.shards, rng)
    elif scheme == "semantic":
        clients = semantic_clients(dataset, args, rng, extra)
    else:
        clients = natural_clients(dataset, args, rng, extra)
    sizes = [len(a) for a in clients]
    if min(sizes) == 0:
        raise DataError(f"client {sizes.index(0)} got no samples under scheme {scheme}; use fewer clients "
                        f"or more --classes per client")
    train, test = _split(clients, args, rng, extra)
    unused = len(labels) - sum(len(a) for a in clients)
    if unused:
        extra["unused_samples"] = unused
    meta = {"format": FORMAT, "dataset": dataset.name, "dataset_size": len(labels),
            "num_classes": dataset.num_classes, "dataset_options": dict(dataset.options),
            "scheme": scheme, "args": asdict(args), **extra}
    part = Partition(train, test, meta)
    part.label_histogram = part.histogram(labels, dataset.num_classes)
    return part


def _dirichlet(
    labels: np.ndarray, args: PartitionArgs, rng: np.random.RandomState
) -> tuple[list[np.ndarray], int]:
    """The reference's Dirichlet draw, same random calls; only sizes are tracked until a draw is accepted."""
    n = args.client_num
    by_label = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    cap = len(labels) / n  # clients holding this many already get no more
    alphas = np.repeat(args.alpha, n)
    bounds = np.zeros(n + 1, dtype=np.int64)  # [0, cuts..., len(idx)]: piece sizes without np.diff's copies
    best = -1
    for draw in range(1, args.max_redraws + 1):
        sizes = np.zeros(n, dtype=np.int64)
        cuts: list[np.ndarray] = []
        for idx in by_label:
            rng.shuffle(idx)  # in place and kept across redraws, as the reference does
            p = rng.dirichlet(alphas)
            p = p * (sizes < cap)
            p = p / p.sum()
            cut = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            cuts.append(cut)
            bounds[1:n] = cut
            bounds[n] = len(idx)
            sizes += bounds[1:] - bounds[:-1]
        best = max(best, int(sizes.min()))
        if sizes.min() >= args.least_samples:
            pieces: list[list[np.ndarray]] = [[] for _ in range(n)]
            for idx, cut in zip(by_label, cuts, strict=True):
                for c, piece in enumerate(np.split(idx, cut)):
                    pieces[c].append(piece)
            return [np.concatenate(p).astype(np.int64) for p in pieces], draw
    raise DataError(
        f"Dirichlet(alpha={args.alpha:g}) found no split giving all {n} clients >= {args.least_samples} "
        f"samples in {args.max_redraws} draws ({len(labels) / n:.0f} per client on average, best draw's "
        f"smallest client {best}); use --least_samples {best} or less, a larger --alpha or fewer --client_num"
    )


def _by_classes(labels: np.ndarray, n: int, k: int, rng: np.random.RandomState) -> list[np.ndarray]:
    """Each client holds k labels; each label's samples are split evenly among the clients holding it."""
    label_set = np.unique(labels)
    if k > len(label_set):
        raise DataError(f"classes={k} but only {len(label_set)} labels occur in the data")
    held = np.zeros(len(label_set), dtype=np.int64)
    holders: list[list[int]] = [[] for _ in label_set]
    for c in range(n):
        # The k least-held labels, ties broken at random: random label sets that still cover every label.
        order = rng.permutation(len(label_set))
        for j in order[np.argsort(held[order], kind="stable")[:k]]:
            held[j] += 1
            holders[j].append(c)
    pieces: list[list[np.ndarray]] = [[] for _ in range(n)]
    for j, label in enumerate(label_set):
        if not holders[j]:
            continue  # fewer client slots than labels: this label's samples stay unused
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        for c, piece in zip(holders[j], np.array_split(idx, len(holders[j])), strict=True):
            pieces[c].append(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in pieces]


def _by_shards(labels: np.ndarray, n: int, shards: int, rng: np.random.RandomState) -> list[np.ndarray]:
    """FedAvg's pathological split: sort by label, cut n*shards shards, deal `shards` to each client."""
    order = np.argsort(labels, kind="stable").astype(np.int64)
    pieces = np.array_split(order, n * shards)
    perm = rng.permutation(n * shards)
    return [np.concatenate([pieces[s] for s in perm[c * shards:(c + 1) * shards]]) for c in range(n)]


def _split(clients: list[np.ndarray], args: PartitionArgs, rng: np.random.RandomState,
           extra: dict[str, Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    empty = np.zeros(0, dtype=np.int64)
    if args.split == "user":
        ids = rng.permutation(len(clients))
        train_ids = set(ids[: int(len(clients) * args.fraction)].tolist())
        extra["train_clients"] = sorted(train_ids)
        return ([a if c in train_ids else empty for c, a in enumerate(clients)],
                [empty if c in train_ids else a for c, a in enumerate(clients)])
    train, test = [], []
    for c, a in enumerate(clients):
        rng.shuffle(a)
        k = int(len(a) * args.fraction)
        if k == 0 or k == len(a):
            raise DataError(f"client {c} has {len(a)} samples, too few to split into train and test with "
                            f"fraction {args.fraction}; use fewer clients or a larger --least_samples")
        train.append(a[:k])
        test.append(a[k:])
    return train, test
