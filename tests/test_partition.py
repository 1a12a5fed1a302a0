"""Partition schemes, the reference Dirichlet reproduction, validation, and the npz format."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcmd_core.data import DataError, Dataset, Partition, PartitionArgs, load_dataset, make_partition

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def labels_dataset(labels: np.ndarray, name: str = "mnist5k", num_classes: int = 10) -> Dataset:
    """A Dataset with the given labels and no real inputs: partitioners only look at labels."""
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return Dataset(name, torch.zeros(len(y), 1), y, num_classes)


@pytest.fixture(scope="module")
def mnist5k() -> Dataset:
    return load_dataset("mnist5k")


@pytest.fixture(scope="module")
def balanced() -> Dataset:
    # 10 labels x 200 samples, label-sorted like mnist5k but cheaper.
    return labels_dataset(np.repeat(np.arange(10), 200))


def all_indices(part: Partition) -> np.ndarray:
    return np.sort(np.concatenate(part.train + part.test))


@pytest.mark.parametrize("seed", [42, 43, 44])
def test_dirichlet_reproduces_shared_partitions(mnist5k: Dataset, seed: int) -> None:
    path = SHARED / f"mnist5k-d01-s{seed}.npz"
    if not path.is_file():
        pytest.skip(f"shared partitions not present at {SHARED} (CI checks out ../shared beside the repo)")
    part = make_partition(mnist5k, PartitionArgs(client_num=50, alpha=0.1, least_samples=20, seed=seed))
    with np.load(path, allow_pickle=False) as ref:
        assert int(ref["num_clients"]) == part.num_clients == 50
        for c in range(50):
            np.testing.assert_array_equal(part.train[c], ref[f"train_{c}"], err_msg=f"train_{c}")
            np.testing.assert_array_equal(part.test[c], ref[f"test_{c}"], err_msg=f"test_{c}")
        ref_meta = json.loads(str(ref["meta"]))
    if "dirichlet_draws" in ref_meta:
        assert part.meta["dirichlet_draws"] == ref_meta["dirichlet_draws"]


def test_shared_partition_imports_for_mnist5k(mnist5k: Dataset) -> None:
    path = SHARED / "mnist5k-d01-s42.npz"
    if not path.is_file():
        pytest.skip(f"shared partitions not present at {SHARED}")
    part = Partition.load(path, mnist5k)
    assert part.num_clients == 50
    np.testing.assert_array_equal(all_indices(part), np.arange(5000))
    assert part.label_histogram is not None and part.label_histogram.sum() == 5000


def test_dirichlet_uses_every_index_once_and_honours_least_samples(balanced: Dataset) -> None:
    args = PartitionArgs(client_num=20, alpha=0.3, least_samples=40, seed=7)
    part = make_partition(balanced, args)
    np.testing.assert_array_equal(all_indices(part), np.arange(len(balanced)))
    for tr, te in zip(part.train, part.test, strict=True):
        n = len(tr) + len(te)
        assert n >= 40
        assert len(tr) == int(n * 0.5)
        assert tr.dtype == te.dtype == np.int64
    assert part.meta["scheme"] == "dirichlet" and part.meta["dirichlet_draws"] >= 1
    # Strong skew: most clients miss some labels.
    assert np.mean((part.label_histogram > 0).sum(axis=1)) < 10


def test_same_seed_same_partition_other_seed_differs(balanced: Dataset) -> None:
    a = make_partition(balanced, PartitionArgs(client_num=10, alpha=0.5, seed=1))
    b = make_partition(balanced, PartitionArgs(client_num=10, alpha=0.5, seed=1))
    c = make_partition(balanced, PartitionArgs(client_num=10, alpha=0.5, seed=2))
    assert all(np.array_equal(x, y) for x, y in zip(a.train, b.train, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.train, c.train, strict=True))


def test_impossible_least_samples_fails_fast_with_a_hint_that_works(mnist5k: Dataset) -> None:
    # The reference would loop forever: 100 samples per client on average, alpha 0.1, least 40.
    # It gives up after max_redraws draws (how long that takes is `fedcmd bench partition`'s business).
    args = PartitionArgs(client_num=50, alpha=0.1, least_samples=40, max_redraws=300)
    with pytest.raises(DataError) as info:
        make_partition(mnist5k, args)
    message = str(info.value)
    assert "\n" not in message and "--alpha" in message and "in 300 draws" in message
    hinted = int(re.search(r"--least_samples (\d+)", message).group(1))
    assert 0 < hinted < 40
    args.least_samples = hinted  # the hint is the best draw seen, so the same seed must succeed
    part = make_partition(mnist5k, args)
    assert min(len(a) + len(b) for a, b in zip(part.train, part.test, strict=True)) >= hinted


def test_more_required_samples_than_data_is_rejected_up_front(balanced: Dataset) -> None:
    with pytest.raises(DataError, match=r"exceeds the 2000 samples.*--least_samples 100 or less"):
        make_partition(balanced, PartitionArgs(client_num=20, alpha=0.5, least_samples=101))


def test_iid_is_balanced_and_covers_everything(balanced: Dataset) -> None:
    part = make_partition(balanced, PartitionArgs(client_num=7, iid=True, alpha=0.1))  # iid wins over alpha
    assert part.meta["scheme"] == "iid"
    sizes = [len(a) + len(b) for a, b in zip(part.train, part.test, strict=True)]
    assert max(sizes) - min(sizes) <= 1
    np.testing.assert_array_equal(all_indices(part), np.arange(len(balanced)))
    assert (part.label_histogram > 0).sum(axis=1).min() == 10


def test_classes_gives_each_client_exactly_k_labels(balanced: Dataset) -> None:
    part = make_partition(balanced, PartitionArgs(client_num=15, classes=2, shards=3))  # classes wins
    assert part.meta["scheme"] == "classes"
    held = part.label_histogram > 0
    assert (held.sum(axis=1) == 2).all()
    assert held.any(axis=0).all()  # 15 x 2 slots cover all 10 labels
    np.testing.assert_array_equal(all_indices(part), np.arange(len(balanced)))
    assert len({tuple(np.flatnonzero(r)) for r in held}) > 1  # not every client holds the same pair


def test_classes_leaves_unheld_labels_unused(balanced: Dataset) -> None:
    part = make_partition(balanced, PartitionArgs(client_num=3, classes=2))
    assert part.meta["unused_samples"] == 4 * 200
    assert len(all_indices(part)) == 6 * 200


def test_shards_follow_sorted_labels(balanced: Dataset) -> None:
    part = make_partition(balanced, PartitionArgs(client_num=10, shards=2))
    assert part.meta["scheme"] == "shards"
    np.testing.assert_array_equal(all_indices(part), np.arange(len(balanced)))
    # 20 shards of 100 over label blocks of 200: every shard is one label, so <= 2 labels per client.
    assert ((part.label_histogram > 0).sum(axis=1) <= 2).all()
    assert {len(a) + len(b) for a, b in zip(part.train, part.test, strict=True)} == {200}


def test_user_split_makes_whole_clients_train_or_test(balanced: Dataset) -> None:
    part = make_partition(balanced, PartitionArgs(client_num=10, alpha=1.0, split="user", fraction=0.7))
    train_clients = part.meta["train_clients"]
    assert len(train_clients) == 7
    for c in range(10):
        if c in train_clients:
            assert len(part.train[c]) > 0 and len(part.test[c]) == 0
        else:
            assert len(part.train[c]) == 0 and len(part.test[c]) > 0
    np.testing.assert_array_equal(all_indices(part), np.arange(len(balanced)))
    assert train_clients != list(range(7))  # chosen by a seeded shuffle, not the first ids


def test_synthetic_natural_partition_is_split_within_each_user() -> None:
    data = load_dataset("synthetic", client_num=5, seed=3)
    part = make_partition(data, PartitionArgs(client_num=5, fraction=0.5, seed=3))
    assert part.meta["scheme"] == "natural"
    for c, natural in enumerate(data.natural_partition or []):
        np.testing.assert_array_equal(np.sort(np.concatenate((part.train[c], part.test[c]))), natural)
        assert len(part.train[c]) == int(len(natural) * 0.5)
    with pytest.raises(DataError, match="generated for 5 clients"):
        make_partition(data, PartitionArgs(client_num=4))
    # An explicit scheme re-partitions the pooled synthetic data.
    assert make_partition(data, PartitionArgs(client_num=4, iid=True)).meta["scheme"] == "iid"


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (PartitionArgs(alpha=-0.1), "alpha must be >= 0"),
        (PartitionArgs(alpha=0.5, fraction=0.0), "fraction must be strictly between 0 and 1"),
        (PartitionArgs(alpha=0.5, fraction=1.0), "fraction must be strictly between 0 and 1"),
        (PartitionArgs(alpha=0.5, client_num=0), "client_num must be between 1 and"),
        (PartitionArgs(alpha=0.5, client_num=5000), "client_num must be between 1 and the dataset size 2000"),
        (PartitionArgs(classes=11), "classes must be between 0 and 10"),
        (PartitionArgs(shards=200), "client_num \\* shards <= 2000"),
        (PartitionArgs(alpha=0.5, split="users"), "split must be 'sample' or 'user'"),  # type: ignore[arg-type]
        (PartitionArgs(alpha=0.5, split="user", fraction=0.01), "at least one training and one test client"),
        (PartitionArgs(), "choose a partition scheme"),
    ],
)
def test_bad_arguments_raise_one_line_data_errors(balanced: Dataset, args: PartitionArgs, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern) as info:
        make_partition(balanced, args)
    assert "\n" not in str(info.value)


def test_histogram_counts_train_and_test_labels() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2, 1, 0])
    part = Partition(train=[np.array([0, 3]), np.array([2])], test=[np.array([4, 1]), np.array([6, 7, 5])])
    expected = np.array([[2, 0, 2], [1, 2, 1]])
    np.testing.assert_array_equal(part.histogram(labels, 3), expected)
    np.testing.assert_array_equal(part.histogram(labels, 4)[:, 3], [0, 0])


def test_save_load_round_trip(balanced: Dataset, tmp_path: Path) -> None:
    part = make_partition(balanced, PartitionArgs(client_num=8, alpha=0.5, least_samples=10))
    path = tmp_path / "sub" / "p.npz"
    part.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["p.npz"]  # no temporary left behind
    with np.load(path, allow_pickle=False) as raw:  # plain arrays, readable without pickle
        assert int(raw["num_clients"]) == 8 and json.loads(str(raw["meta"]))["dataset"] == "mnist5k"
        np.testing.assert_array_equal(raw["histogram"], part.label_histogram)
    back = Partition.load(path, balanced)
    assert back.meta == json.loads(json.dumps(part.meta))
    for a, b in zip(part.train + part.test, back.train + back.test, strict=True):
        np.testing.assert_array_equal(a, b)
        assert b.dtype == np.int64
    np.testing.assert_array_equal(back.label_histogram, part.label_histogram)


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(
    balanced: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "p.npz"
    path.write_bytes(b"old")

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", boom)
    part = make_partition(balanced, PartitionArgs(client_num=4, iid=True))
    with pytest.raises(OSError, match="disk full"):
        part.save(path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["p.npz"]


def test_external_npz_without_meta_imports(balanced: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "external.npz"
    rng = np.random.default_rng(0)
    order = rng.permutation(len(balanced)).astype(np.int32)  # other integer widths are fine
    np.savez(path, train_0=order[:500], test_0=order[500:1000], train_1=order[1000:1500], test_1=order[1500:])
    part = Partition.load(path, balanced)
    assert part.num_clients == 2 and part.meta["scheme"] == "external"
    assert part.train[0].dtype == np.int64
    np.testing.assert_array_equal(part.label_histogram.sum(axis=1), [1000, 1000])


@pytest.mark.parametrize(
    ("arrays", "pattern"),
    [
        ({"train_0": np.arange(3), "test_0": np.arange(3), "train_1": np.arange(2)}, "test_1 is missing"),
        ({"train_0": np.arange(3.0), "test_0": np.arange(3)}, "1-D integer index array"),
        ({"train_0": np.array([-1]), "test_0": np.arange(3)}, "negative indices"),
        ({"x": np.arange(3)}, "holds no train_<c>/test_<c> arrays"),
        ({"train_0": np.arange(3), "test_0": np.arange(3), "num_clients": np.array(2)}, "num_clients says 2"),
        ({"train_0": np.arange(3), "test_0": np.arange(3), "meta": np.array("{not json")}, "not valid JSON"),
    ],
)
def test_malformed_external_npz_is_rejected(tmp_path: Path, arrays: dict[str, np.ndarray], pattern: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=pattern):
        Partition.load(path)


def test_unreadable_or_missing_files_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        Partition.load(tmp_path / "nope.npz")
    text = tmp_path / "text.npz"
    text.write_text("hello")
    with pytest.raises(DataError, match="not a readable npz"):
        Partition.load(text)
    npy = tmp_path / "plain.npy"
    np.save(npy, np.arange(3))
    with pytest.raises(DataError, match="not an npz archive"):
        Partition.load(npy)


def test_wrong_dataset_is_detected(balanced: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "p.npz"
    make_partition(balanced, PartitionArgs(client_num=4, iid=True)).save(path)
    digits_like = labels_dataset(np.arange(2000) % 10, name="digits")
    with pytest.raises(DataError, match="made for dataset mnist5k, not digits"):
        Partition.load(path, digits_like)
    smaller = labels_dataset(np.arange(1000) % 10, name="mnist5k")
    with pytest.raises(DataError, match="with 2000 samples, this one has 1000"):
        Partition.load(path, smaller)
    external = tmp_path / "ext.npz"
    np.savez(external, train_0=np.array([0, 1999]), test_0=np.array([5]))
    with pytest.raises(DataError, match="uses sample 1999 but digits has only 1000 samples"):
        Partition.load(external, labels_dataset(np.arange(1000) % 10, name="digits"))
