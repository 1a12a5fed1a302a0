"""The image-folder, npz and LEAF loaders on tiny files in each set's own on-disk format, and one simulate."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fedcmd_core.data import DATASET_INFO, DATASET_NAMES, DataError, load_dataset
from fedcmd_core.data.cinic import CLASSES as CINIC_CLASSES
from fedcmd_core.data.domainnet import DOMAINS, choose_classes
from fedcmd_core.models import build_model

NEW = ("cinic10", "tinyimagenet", "medmnists", "medmnista", "medmnistc", "femnist", "celeba", "domainnet")


def write_image(path: Path, value: int, size: tuple[int, int] = (32, 32), channels: int = 3) -> None:
    """A flat image: channel c holds value + c (grey: value). Width x height as PIL counts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if channels == 1:
        Image.new("L", size, value).save(path)
    else:
        Image.new("RGB", size, (value, value + 1, value + 2)).save(path)


def raw_pixels(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Undo the normalisation: back to 0..255 per channel."""
    c = len(mean)
    return (x * torch.tensor(std).view(1, c, 1, 1) + torch.tensor(mean).view(1, c, 1, 1)) * 255


def channel_values(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """[N, C] mean raw value of every channel of every sample."""
    return raw_pixels(x, mean, std).mean(dim=(2, 3)).numpy()


def test_registry_lists_every_new_set_and_imports_no_decoder() -> None:
    assert set(NEW) <= set(DATASET_NAMES) and set(DATASET_INFO) == set(DATASET_NAMES)
    heavy = "('torchvision', 'PIL', 'sklearn')"
    code = f"import sys, fedcmd_core.data; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- CINIC-10 ---------------------------------------------------------------------------------------------


def write_cinic(root: Path, per_class: int = 1) -> None:
    """Every split x class folder; sample value = 10 * split + class (+ i * 100)."""
    for s, split in enumerate(("train", "valid", "test")):
        for k, name in enumerate(CINIC_CLASSES):
            for i in range(per_class):
                write_image(root / "cinic10" / split / name / f"img{i}.png", 10 * s + k + 100 * i)


def test_cinic10_concatenates_train_valid_test_in_class_order(tmp_path: Path) -> None:
    from fedcmd_core.data.cinic import MEAN, STD

    write_cinic(tmp_path)
    write_image(tmp_path / "cinic10" / "test" / "truck" / "big.png", 250, size=(40, 36))  # resized to 32x32
    data = load_dataset("cinic10", root=tmp_path)
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10 and len(data) == 31
    assert data.y.tolist() == list(range(10)) * 3 + [9]
    expected = [10 * s + k for s in range(3) for k in range(10)]
    # test/truck: 'big.png' sorts before 'img0.png'
    expected = [*expected[:29], 250, 29]
    np.testing.assert_allclose(channel_values(data.x, MEAN, STD)[:, 0], expected, atol=0.01)
    np.testing.assert_allclose(channel_values(data.x, MEAN, STD)[:, 2], np.array(expected) + 2, atol=0.01)


def test_cinic10_missing_folder_names_the_path_and_the_download(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("cinic10", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "cinic10" / "train" / "airplane") in message and "datashare.ed.ac.uk" in message
    with pytest.raises(DataError, match="pass --root ROOT"):
        load_dataset("cinic10")


def test_corrupt_image_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    write_cinic(tmp_path)
    bad = tmp_path / "cinic10" / "valid" / "cat" / "img0.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=f"could not decode {re.escape(str(bad))}"):
        load_dataset("cinic10", root=tmp_path)


# ---- Tiny-ImageNet ----------------------------------------------------------------------------------------


def test_tinyimagenet_orders_by_wnids_and_labels_val_from_annotations(tmp_path: Path) -> None:
    from fedcmd_core.data.tinyimagenet import MEAN, STD

    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]  # deliberately unsorted: wnids.txt order is the label order
    base.mkdir()
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for k, w in enumerate(wnids):
        for i in range(2):
            write_image(base / "train" / w / "images" / f"{w}_{i}.JPEG", 20 * k + 60 * i, size=(64, 64))
        (base / "train" / w / f"{w}_boxes.txt").write_text("ignored\n")
    (base / "val" / "val_annotations.txt").parent.mkdir(parents=True)
    (base / "val" / "val_annotations.txt").write_text("val_1.JPEG\tn03\t0\t0\t63\t63\nval_0.JPEG\tn01\t1\t2\t3\t4\n")
    write_image(base / "val" / "images" / "val_0.JPEG", 200, size=(64, 64))
    write_image(base / "val" / "images" / "val_1.JPEG", 220, size=(64, 64))
    write_image(base / "test" / "images" / "test_0.JPEG", 5, size=(64, 64))  # unlabelled: not read
    data = load_dataset("tinyimagenet", root=tmp_path)
    assert data.input_shape == (3, 64, 64) and data.num_classes == 3 and len(data) == 8
    assert data.y.tolist() == [0, 0, 1, 1, 2, 2, 1, 2]
    red = channel_values(data.x, MEAN, STD)[:, 0]
    np.testing.assert_allclose(red, [0, 60, 20, 80, 40, 100, 200, 220], atol=3.0)  # JPEG: a grey level or two
    (base / "val" / "val_annotations.txt").unlink()
    missing = re.escape(str(base / "val" / "val_annotations.txt"))
    with pytest.raises(DataError, match=f"missing {missing}.*tiny-imagenet-200"):
        load_dataset("tinyimagenet", root=tmp_path)


# ---- MedMNIST ---------------------------------------------------------------------------------------------


def write_medmnist(path: Path, starts: dict[str, list[int]], labels: dict[str, list[int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = np.stack([np.full((28, 28), v, np.uint8) for v in starts[split]])
        arrays[f"{split}_labels"] = np.array(labels[split], dtype=np.uint8).reshape(-1, 1)
    np.savez_compressed(path, **arrays)


def test_medmnist_reads_official_npz_in_both_places(tmp_path: Path) -> None:
    from fedcmd_core.data.medmnist import SETS

    write_medmnist(tmp_path / "medmnist" / "organamnist.npz", {"train": [1, 2], "val": [3], "test": [4, 5]},
                   {"train": [10, 0], "val": [5], "test": [7, 1]})
    data = load_dataset("medmnista", root=tmp_path)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 11 and data.y.tolist() == [10, 0, 5, 7, 1]
    _, _, mean, std = SETS["medmnista"]
    np.testing.assert_allclose(channel_values(data.x, (mean,), (std,))[:, 0], [1, 2, 3, 4, 5], atol=1e-3)
    write_medmnist(tmp_path / "organsmnist.npz", {"train": [9], "val": [8], "test": [7]},
                   {"train": [3], "val": [2], "test": [1]})
    assert load_dataset("medmnists", root=tmp_path).y.tolist() == [3, 2, 1]  # root itself also works
    with pytest.raises(DataError) as info:
        load_dataset("medmnistc", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "medmnist" / "organcmnist.npz") in message and "zenodo.org" in message
    write_medmnist(tmp_path / "medmnist" / "organcmnist.npz", {"train": [1], "val": [1], "test": [1]},
                   {"train": [11], "val": [0], "test": [0]})
    with pytest.raises(DataError, match=r"labels outside 0\.\.10"):
        load_dataset("medmnistc", root=tmp_path)


# ---- FEMNIST ----------------------------------------------------------------------------------------------


def leaf_json(users: dict[str, tuple[list[float], list[int]]]) -> dict:
    """LEAF's json: every user's x is a list of 784-float rows (row j filled with that user's value j)."""
    return {"users": list(users), "num_samples": [len(y) for _, y in users.values()],
            "user_data": {u: {"x": [[v] * 784 for v in xs], "y": ys} for u, (xs, ys) in users.items()}}


def write_femnist(root: Path, users: dict[str, tuple[int, int]] | None = None) -> None:
    """Writers f0..: train json files and test json files; pixel value = label / 100."""
    users = users or {"f_b": (3, 2), "f_a": (2, 1), "f_c": (0, 2)}  # writer: (train samples, test samples)
    base = root / "femnist" / "data"
    for split, col in (("train", 0), ("test", 1)):
        (base / split).mkdir(parents=True, exist_ok=True)
        rows = {}
        for w, (u, counts) in enumerate(users.items()):
            labels = [(7 * w + 3 * col + i) % 62 for i in range(counts[col])]
            rows[u] = ([lab / 100 for lab in labels], labels)
        # split over two files, as LEAF writes at most 100 writers per file
        names = list(rows)
        for f, chunk in enumerate((names[:1], names[1:])):
            blob = leaf_json({u: rows[u] for u in chunk})
            (base / split / f"all_data_{f}_niid_0_keep_0_{split}_9.json").write_text(json.dumps(blob))


def test_femnist_reads_leaf_json_and_splits_by_writer(tmp_path: Path) -> None:
    from fedcmd_core.data.femnist import MEAN, STD

    write_femnist(tmp_path)
    data = load_dataset("femnist", root=tmp_path)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 62 and len(data) == 10
    assert data.natural_unit == "user" and data.natural_names == ["f_b", "f_a", "f_c"]
    assert [p.tolist() for p in data.natural_partition or []] == [[0, 1, 2, 3, 4], [5, 6, 7], [8, 9]]
    # writer 0: train labels 0,1,2 then test labels 3,4; writer 1: 7,8 then 10; writer 2 (test only): 17,18
    assert data.y.tolist() == [0, 1, 2, 3, 4, 7, 8, 10, 17, 18]
    pixels = (data.x * STD + MEAN).reshape(10, -1)
    np.testing.assert_allclose(pixels.mean(1).numpy(), data.y.numpy() / 100, atol=1e-6)
    for f in (tmp_path / "femnist" / "data" / "test").iterdir():
        f.unlink()
    (tmp_path / "femnist" / "data" / "test").rmdir()
    with pytest.raises(DataError, match=f"missing {re.escape(str(tmp_path / 'femnist' / 'data' / 'test'))}.*LEAF"):
        load_dataset("femnist", root=tmp_path)


def test_femnist_bad_json_is_a_data_error(tmp_path: Path) -> None:
    write_femnist(tmp_path)
    bad = next((tmp_path / "femnist" / "data" / "train").iterdir())
    bad.write_text(json.dumps({"users": ["x"], "user_data": {}}))
    with pytest.raises(DataError, match="is not a LEAF json"):
        load_dataset("femnist", root=tmp_path)


# ---- CelebA -----------------------------------------------------------------------------------------------


ATTRS = ["5_o_Clock_Shadow", "Smiling", "Young"]


def write_celeba(root: Path) -> dict[str, int]:
    """Celebrities 7 (5 images), 3 (6), 9 (2: dropped, LEAF keeps >= 5); returns file -> image value."""
    base = root / "celeba"
    owners = ["7"] * 3 + ["3"] * 2 + ["9"] * 2 + ["7"] * 2 + ["3"] * 4
    files = [f"{i + 1:06d}.jpg" for i in range(len(owners))]
    values = {f: 10 + 15 * i for i, f in enumerate(files)}
    for f in files:
        write_image(base / "img_align_celeba" / f, values[f], size=(18, 22))  # 178x218 in the real set
    (base / "identity_CelebA.txt").write_text("".join(f"{f} {o}\n" for f, o in zip(files, owners)))
    rows = [f"{f}  {' '.join(['-1', '1' if i % 3 == 0 else '-1', '1'])}" for i, f in enumerate(files)]
    (base / "list_attr_celeba.txt").write_text(f"{len(files)}\n{' '.join(ATTRS)}\n" + "\n".join(rows) + "\n")
    return values


def test_celeba_leaf_task_by_celebrity(tmp_path: Path) -> None:
    from fedcmd_core.data.celeba import MEAN, STD

    values = write_celeba(tmp_path)
    data = load_dataset("celeba", root=tmp_path)
    assert data.input_shape == (3, 84, 84) and data.num_classes == 2 and len(data) == 11
    assert data.natural_unit == "user" and data.natural_names == ["7", "3"]
    order = [1, 2, 3, 8, 9, 4, 5, 10, 11, 12, 13]  # celebrity 7's images, then celebrity 3's (1-based)
    assert [p.tolist() for p in data.natural_partition or []] == [list(range(5)), list(range(5, 11))]
    assert data.y.tolist() == [1 if (i - 1) % 3 == 0 else 0 for i in order]  # Smiling: rows 0, 3, 6, ...
    red = channel_values(data.x, MEAN, STD)[:, 0]
    np.testing.assert_allclose(red, [values[f"{i:06d}.jpg"] for i in order], atol=3.0)
    young = load_dataset("celeba", root=tmp_path, attribute="Young", max_users=1)
    assert len(young) == 5 and young.y.tolist() == [1] * 5 and young.options["max_users"] == 1
    with pytest.raises(DataError, match=r"unknown attribute 'Smile'.*Smiling"):
        load_dataset("celeba", root=tmp_path, attribute="Smile")
    (tmp_path / "celeba" / "img_align_celeba" / "000009.jpg").unlink()
    with pytest.raises(DataError, match=r"000009\.jpg listed but missing"):
        load_dataset("celeba", root=tmp_path)
    missing = re.escape(str(tmp_path / "x" / "celeba" / "img_align_celeba"))
    with pytest.raises(DataError, match=f"missing {missing}.*CelebA"):
        load_dataset("celeba", root=tmp_path / "x")


# ---- DomainNet --------------------------------------------------------------------------------------------


def write_domainnet(root: Path, classes: tuple[str, ...] = ("apple", "bee", "cat")) -> None:
    """Every domain: 2 train + 1 test image of each class; value = 30 * domain + 10 * class + image."""
    base = root / "domainnet"
    for d, domain in enumerate(DOMAINS):
        lines: dict[str, list[str]] = {"train": [], "test": []}
        for k, cls in enumerate(classes):
            for i in range(3):
                rel = f"{domain}/{cls}/{domain}_{k:03d}_{i:06d}.jpg"
                write_image(base / rel, 30 * d + 10 * k + i, size=(20, 24))
                lines["train" if i < 2 else "test"].append(f"{rel} {k}")
        for split, rows in lines.items():
            (base / f"{domain}_{split}.txt").write_text("\n".join(rows) + "\n")


def test_domainnet_class_subset_size_and_domains(tmp_path: Path) -> None:
    write_domainnet(tmp_path)
    kept = choose_classes(["apple", "bee", "cat"], 2)
    assert kept == sorted(random.Random(42).sample(["apple", "bee", "cat"], 2))  # FL-bench's rule, seed 42
    data = load_dataset("domainnet", root=tmp_path, class_num=2, image_size=16)
    assert data.input_shape == (3, 16, 16) and data.num_classes == 2 and len(data) == 6 * 2 * 3
    assert data.natural_unit == "domain" and data.natural_names == list(DOMAINS)
    parts = data.natural_partition or []
    assert [p.tolist() for p in parts] == [list(range(6 * d, 6 * d + 6)) for d in range(6)]
    ks = [["apple", "bee", "cat"].index(c) for c in kept]
    # per domain: the train lines (class by class, two images) then the test lines
    per_domain = [(k, i) for k in ks for i in (0, 1)] + [(k, 2) for k in ks]
    assert data.y.tolist()[:6] == [ks.index(k) for k, _ in per_domain]
    expected = [30 * d + 10 * k + i for d in range(6) for k, i in per_domain]
    red = channel_values(data.x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))[:, 0]
    np.testing.assert_allclose(red, expected, atol=3.0)
    assert data.options == {"class_num": 2, "image_size": 16}
    with pytest.raises(DataError, match="class_num must be between 1 and the 3 classes"):
        load_dataset("domainnet", root=tmp_path, class_num=4)
    (tmp_path / "domainnet" / "sketch_test.txt").unlink()
    with pytest.raises(DataError, match=f"missing {re.escape(str(tmp_path / 'domainnet' / 'sketch_test.txt'))}.*M3SDA"):
        load_dataset("domainnet", root=tmp_path, class_num=2)


# ---- models and one run -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 64, 64), (1, 28, 28), (3, 84, 84)])
def test_lenet5_fits_every_new_input_shape(shape: tuple[int, ...]) -> None:
    model = build_model("lenet5", shape, 11, seed=0)
    assert model(torch.zeros(2, *shape)).shape == (2, 11)


def test_simulate_runs_one_round_on_a_tiny_cinic10_root(tmp_path: Path) -> None:
    from cloud.cli.main import app

    write_cinic(tmp_path / "data", per_class=2)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "simulate", "--algo", "fedavg", "-d", "cinic10", "--root", str(tmp_path / "data"), "-cn", "2",
        "-a", "1.0", "-ls", "10", "-jr", "1", "-ge", "1", "-le", "1", "-tg", "0", "--quiet", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2  # header + round 1
    assert 0 <= summary["final_personalized_acc"] <= 100


def test_simulate_loads_the_dataset_as_its_partition_was_made(tmp_path: Path) -> None:
    """A partition of CelebA limited to one celebrity (--max-users 1) indexes 5 images: simulate reloads the
    dataset with the options the partition recorded, not the full 11-image set."""
    from cloud.cli.main import app

    write_celeba(tmp_path)
    part = tmp_path / "p.npz"
    made = CliRunner().invoke(app, [
        "data", "partition", "-d", "celeba", "--root", str(tmp_path), "--max-users", "1", "-cn", "1",
        "-ls", "2", "--out", str(part),
    ])
    assert made.exit_code == 0, made.output
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "simulate", "--algo", "fedavg", "-d", "celeba", "--root", str(tmp_path), "--partition", str(part),
        "-jr", "1", "-ge", "1", "-le", "1", "-tg", "0", "--quiet", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "celeba"
    assert len((out / "metrics.csv").read_text().splitlines()) == 2
