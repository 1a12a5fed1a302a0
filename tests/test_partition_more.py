"""split=user, the natural user/domain partitions, and the semantic scheme (library and `fedcmd data`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_datasets_more import write_femnist
from typer.testing import CliRunner

from cloud.cli.data import data_app
from fedcmd_core.data import DATASET_NAMES, DataError, Dataset, Partition, PartitionArgs, load_dataset, make_partition
from fedcmd_core.data.semantic import gaussian_kl


def labelled(labels: np.ndarray, x: torch.Tensor | None = None, **natural: object) -> Dataset:
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    data = Dataset("mnist5k", x if x is not None else torch.zeros(len(y), 1), y, int(y.max()) + 1)
    for key, value in natural.items():
        setattr(data, key, value)
    return data


def every_index(part: Partition) -> np.ndarray:
    return np.sort(np.concatenate(part.train + part.test))


# ---- split=user --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("clients", "fraction", "train_clients"), [(10, 0.5, 5), (10, 0.75, 7), (7, 0.3, 2)])
def test_user_split_counts_and_disjoint_samples_survive_save(
    tmp_path: Path, clients: int, fraction: float, train_clients: int
) -> None:
    data = labelled(np.repeat(np.arange(10), 70))
    args = PartitionArgs(client_num=clients, iid=True, split="user", fraction=fraction, seed=4)
    part = make_partition(data, args)
    train = [c for c in range(clients) if len(part.train[c])]
    test = [c for c in range(clients) if len(part.test[c])]
    assert len(train) == train_clients and len(test) == clients - train_clients
    assert not set(train) & set(test) and part.meta["train_clients"] == train
    train_samples = np.concatenate(part.train)
    test_samples = np.concatenate(part.test)
    assert np.intersect1d(train_samples, test_samples).size == 0
    np.testing.assert_array_equal(every_index(part), np.arange(len(data)))
    path = tmp_path / "user.npz"
    part.save(path)
    back = Partition.load(path, data)
    assert back.meta["args"]["split"] == "user" and back.meta["train_clients"] == train
    assert [len(a) for a in back.train] == [len(a) for a in part.train]
    assert [len(a) for a in back.test] == [len(a) for a in part.test]


# ---- natural partitions ------------------------------------------------------------------------------------


def users_dataset(sizes: list[int]) -> Dataset:
    bounds = np.cumsum([0, *sizes])
    parts = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
    return labelled(np.arange(bounds[-1]) % 5, natural_partition=parts, natural_unit="user",
                    natural_names=[f"w{i}" for i in range(len(sizes))])


def test_natural_users_drop_small_ones_and_give_each_client_one_user() -> None:
    data = users_dataset([50, 10, 45, 60, 41, 39])
    args = PartitionArgs(client_num=3, least_samples=40, seed=11)
    part = make_partition(data, args)
    assert part.meta["scheme"] == "natural"
    users = part.meta["natural_users"]
    assert len(users) == 3 and set(users) <= {"w0", "w2", "w3", "w4"}  # w1 and w5 have < 40 samples
    parts = data.natural_partition or []
    for c, name in enumerate(users):
        np.testing.assert_array_equal(np.sort(np.concatenate((part.train[c], part.test[c]))), parts[int(name[1:])])
    assert part.meta["unused_samples"] == len(data) - sum(len(parts[int(u[1:])]) for u in users)
    again = make_partition(data, args)
    assert again.meta["natural_users"] == users
    assert make_partition(data, PartitionArgs(client_num=4, least_samples=40, seed=11)).meta["natural_users"] == [
        "w0", "w2", "w3", "w4"]
    with pytest.raises(DataError, match=r"4 users with >= 40 samples .* --client_num 4 or less"):
        make_partition(data, PartitionArgs(client_num=5, least_samples=40))
    assert len(data.natural_partition[0]) == 50 and (np.diff(data.natural_partition[0]) == 1).all()  # untouched


def test_natural_domains_split_each_domain_among_equal_clients() -> None:
    dom = np.repeat(np.arange(3), [60, 80, 100])
    parts = [np.flatnonzero(dom == d) for d in range(3)]
    data = labelled(np.arange(240) % 4, natural_partition=parts, natural_unit="domain",
                    natural_names=["clipart", "real", "sketch"])
    part = make_partition(data, PartitionArgs(client_num=6, least_samples=20, seed=2))
    assert part.meta["client_domains"] == ["clipart", "clipart", "real", "real", "sketch", "sketch"]
    sizes = [len(a) + len(b) for a, b in zip(part.train, part.test, strict=True)]
    assert sizes == [30, 30, 40, 40, 50, 50]
    for c in range(6):
        held = np.concatenate((part.train[c], part.test[c]))
        assert len(set(dom[held].tolist())) == 1
    np.testing.assert_array_equal(every_index(part), np.arange(240))
    with pytest.raises(DataError, match="must be a multiple of 3"):
        make_partition(data, PartitionArgs(client_num=4))
    with pytest.raises(DataError, match="smallest client gets 30 samples, below least_samples 40"):
        make_partition(data, PartitionArgs(client_num=6, least_samples=40))
    assert make_partition(data, PartitionArgs(client_num=6, alpha=1.0, least_samples=5)).meta["scheme"] == "dirichlet"


# ---- semantic partition ------------------------------------------------------------------------------------


def styled_images(classes: int = 4, styles: int = 4, per: int = 25, seed: int = 0) -> tuple[Dataset, np.ndarray]:
    """x = class pattern + style pattern + small noise: every class holds the same `styles` clusters."""
    rng = np.random.default_rng(seed)
    class_pat = rng.normal(0, 1.0, (classes, 64))
    style_pat = rng.normal(0, 2.0, (styles, 64))  # styles differ more than classes: the clusters to find
    k = np.repeat(np.arange(classes), styles * per)
    s = np.tile(np.repeat(np.arange(styles), per), classes)
    x = class_pat[k] + style_pat[s] + rng.normal(0, 0.1, (len(k), 64))
    order = rng.permutation(len(k))  # not grouped by class or style
    data = labelled(k[order], torch.from_numpy(x[order].astype(np.float32)).view(-1, 1, 8, 8))
    return data, s[order]


def mean_within_client_distance(x: np.ndarray, clients: list[np.ndarray]) -> float:
    dists = [np.linalg.norm(x[c][:, None] - x[c][None], axis=-1).mean() for c in clients]
    return float(np.mean(dists))


def test_semantic_gives_each_client_one_style_of_every_class() -> None:
    data, style = styled_images()
    args = PartitionArgs(client_num=4, semantic=True, pca_components=8, least_samples=0, seed=3)
    part = make_partition(data, args)
    assert part.meta["scheme"] == "semantic" and part.meta["semantic"]["pca_dims"] == 8
    np.testing.assert_array_equal(every_index(part), np.arange(len(data)))  # every sample exactly once
    assert (part.label_histogram > 0).all()  # every client holds every class
    clients = [np.concatenate((a, b)) for a, b in zip(part.train, part.test, strict=True)]
    # Matching by KL pairs the same style across classes: each client is one style, all four distinct.
    held = [set(style[c].tolist()) for c in clients]
    assert all(len(h) == 1 for h in held) and set().union(*held) == {0, 1, 2, 3}
    flat = data.x.reshape(len(data), -1).numpy()
    shuffled = np.random.default_rng(1).permutation(len(data))
    random_clients = np.split(shuffled, np.cumsum([len(c) for c in clients])[:-1])
    assert mean_within_client_distance(flat, clients) < 0.75 * mean_within_client_distance(flat, random_clients)
    again = make_partition(data, args)
    assert all(np.array_equal(a, b) for a, b in zip(part.train + part.test, again.train + again.test, strict=True))


def test_semantic_class_smaller_than_client_count_goes_to_distinct_clients() -> None:
    data, _ = styled_images(classes=3, styles=4, per=10)
    keep = np.sort(np.concatenate((np.flatnonzero(data.labels != 2), np.flatnonzero(data.labels == 2)[:3])))
    small = labelled(data.labels[keep], data.x[keep])  # class 2 keeps 3 samples for 4 clients
    n2 = 3
    part = make_partition(small, PartitionArgs(client_num=4, semantic=True, pca_components=6, split="user",
                                               fraction=0.5, least_samples=0))
    np.testing.assert_array_equal(every_index(part), np.arange(len(small)))
    assert int((part.label_histogram[:, 2] > 0).sum()) == n2 and part.label_histogram[:, 2].max() == 1


def test_gaussian_kl_matches_the_closed_form() -> None:
    m0, m1 = np.array([[0.0, 0.0]]), np.array([[1.0, 2.0], [0.0, 0.0]])
    s0 = np.array([np.eye(2)])
    s1 = np.array([np.diag([2.0, 0.5]), np.eye(2)])
    kl = gaussian_kl(m0, s0, m1, s1)
    # KL(N(0, I) || N(m, diag(a, b))) = 0.5 * (1/a + 1/b + m1^2/a + m2^2/b - 2 + ln(a b))
    expected = 0.5 * (1 / 2 + 1 / 0.5 + 1 / 2 + 4 / 0.5 - 2 + np.log(1.0))
    np.testing.assert_allclose(kl, [[expected, 0.0]], atol=1e-12)


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (PartitionArgs(client_num=4, semantic=True, semantic_features="efficientnet"), "use --semantic-features pca"),
        (PartitionArgs(client_num=4, semantic=True, pca_components=0), "pca_components must be >= 1"),
        (PartitionArgs(client_num=4, semantic=True, gmm_init_params="best"), "gmm_init_params must be one of"),
    ],
)
def test_semantic_bad_arguments(args: PartitionArgs, pattern: str) -> None:
    data, _ = styled_images(per=5)
    with pytest.raises(DataError, match=pattern):
        make_partition(data, args)


# ---- `fedcmd data` -----------------------------------------------------------------------------------------


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    return lambda *args: runner.invoke(data_app, list(args))


def test_cli_semantic_on_digits(run, tmp_path: Path) -> None:
    result = run("partition", "-d", "digits", "--semantic", "-cn", "5", "--pca-components", "8", "--no-plot")
    assert result.exit_code == 0, result.output
    part = Partition.load(tmp_path / "runs" / "partitions" / "digits-semantic-s42.npz", load_dataset("digits"))
    assert part.meta["scheme"] == "semantic" and part.meta["args"]["pca_components"] == 8
    np.testing.assert_array_equal(every_index(part), np.arange(1797))
    assert (part.label_histogram > 0).all()
    bad = run("partition", "-d", "digits", "-sm", "--semantic-features", "efficientnet", "--out", "x.npz")
    assert bad.exit_code == 2 and "use --semantic-features pca" in bad.stderr


def test_cli_femnist_natural_and_user_split_then_show(run, tmp_path: Path) -> None:
    write_femnist(tmp_path / "data", {f"w{i}": (4 + i, 2) for i in range(5)})
    result = run("partition", "-d", "femnist", "--root", str(tmp_path / "data"), "-cn", "4", "-ls", "7",
                 "--split", "user", "-f", "0.5", "--no-plot")
    assert result.exit_code == 0, result.output
    assert "2 / 2 (split=user)" in result.stdout
    out = tmp_path / "runs" / "partitions" / "femnist-natural-s42.npz"
    part = Partition.load(out)
    assert part.meta["scheme"] == "natural" and part.meta["natural_users"] == ["w1", "w2", "w3", "w4"]
    assert sum(len(a) > 0 for a in part.train) == 2 and sum(len(a) > 0 for a in part.test) == 2
    shown = run("show", str(out), "-d", "femnist", "--root", str(tmp_path / "data"))
    assert shown.exit_code == 0, shown.output
    too_many = run("partition", "-d", "femnist", "--root", str(tmp_path / "data"), "-cn", "5", "-ls", "7",
                   "--out", str(tmp_path / "x.npz"))
    assert too_many.exit_code == 2 and "--client_num 4 or less" in too_many.stderr


def test_cli_list_shows_every_dataset(run) -> None:
    result = run("list")
    assert result.exit_code == 0, result.output
    assert all(name in result.stdout for name in DATASET_NAMES)
    assert "ROOT/tiny-imagenet-200/" in result.stdout
