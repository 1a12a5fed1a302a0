"""`fedcmd data partition` and `fedcmd data show`, driven through typer's CliRunner on the sub-app."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cloud.cli.data import data_app
from fedcmd_core.data import Partition, PartitionArgs, load_dataset, make_partition

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # default outputs go under runs/ of the current folder
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(data_app, list(args))

    return invoke


def assert_user_error(result, *, contains: str) -> None:
    """Exit 2, one red 'error:' line on stderr, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert contains in lines[0]
    assert "Traceback" not in result.output and not isinstance(result.exception, (ValueError, OSError))


def test_partition_writes_npz_png_and_summary(run, tmp_path: Path) -> None:
    result = run("partition", "-d", "digits", "-a", "0.5", "-cn", "10", "-ls", "30", "--seed", "3")
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "partitions" / "digits-dir0.5-s3.npz"
    png = out.with_name(out.name + ".png")  # p.npz -> p.npz.png, as the README says
    assert out.is_file() and png.read_bytes().startswith(PNG_MAGIC)
    assert "dirichlet" in result.stdout and "digits" in result.stdout
    # Same as the library call with the same arguments.
    expected = make_partition(load_dataset("digits"),
                              PartitionArgs(client_num=10, alpha=0.5, least_samples=30, seed=3))
    saved = Partition.load(out, load_dataset("digits"))
    for a, b in zip(expected.train + expected.test, saved.train + saved.test, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "flags",
    [
        ["--client_num", "6", "--least_samples", "20", "--fraction", "0.6"],
        ["--client-num", "6", "--least-samples", "20", "-f", "0.6"],
        ["-cn", "6", "-ls", "20", "-f", "0.6"],
    ],
)
def test_seed_flag_spellings(run, tmp_path: Path, flags: list[str]) -> None:
    out = tmp_path / "p.npz"
    result = run("partition", "-d", "digits", "--alpha", "1.0", *flags, "--out", str(out), "--no-plot")
    assert result.exit_code == 0, result.output
    part = Partition.load(out)
    assert part.num_clients == 6 and part.meta["args"]["least_samples"] == 20
    assert part.meta["args"]["fraction"] == 0.6
    assert not out.with_name(out.name + ".png").exists()


def test_other_schemes_and_synthetic(run, tmp_path: Path) -> None:
    for flags, scheme in ((["--iid"], "iid"), (["-c", "3"], "classes"), (["-s", "2"], "shards")):
        out = tmp_path / f"{scheme}.npz"
        result = run("partition", "-d", "digits", "-cn", "5", *flags, "--out", str(out))
        assert result.exit_code == 0, result.output
        assert Partition.load(out).meta["scheme"] == scheme
    out = tmp_path / "syn.npz"
    result = run("partition", "-d", "synthetic", "-cn", "5", "--gamma", "1", "--beta", "1", "--dimension", "8",
                 "--out", str(out))
    assert result.exit_code == 0, result.output
    part = Partition.load(out)
    assert part.meta["scheme"] == "natural" and part.num_clients == 5
    assert part.meta["dataset_options"]["dimension"] == 8


def test_existing_output_needs_force(run, tmp_path: Path) -> None:
    out = tmp_path / "p.npz"
    assert run("partition", "-d", "digits", "--iid", "--out", str(out)).exit_code == 0
    before = out.read_bytes()
    assert_user_error(run("partition", "-d", "digits", "--iid", "--seed", "9", "--out", str(out)),
                      contains="already exists; pass --force")
    assert out.read_bytes() == before
    assert run("partition", "-d", "digits", "--iid", "--seed", "9", "--out", str(out), "--force").exit_code == 0
    assert out.read_bytes() != before


@pytest.mark.parametrize(
    ("args", "contains"),
    [
        (["-d", "cifar11", "-a", "0.1"], "unknown dataset 'cifar11'"),
        (["-d", "digits", "-a", "-1"], "alpha must be >= 0"),
        (["-d", "digits", "-a", "0.1", "-f", "1.5"], "fraction must be strictly between 0 and 1"),
        (["-d", "digits", "-a", "0.3", "--iid"], "-a/--alpha 0.3 (Dirichlet) and --iid are two partition schemes"),
        (["-d", "digits", "-c", "2", "-s", "3"], "--classes and --shards are two partition schemes"),
        (["-d", "digits", "-c", "11"], "classes must be between 0 and 10"),
        (["-d", "mnist5k", "-a", "0.1", "-cn", "50", "-ls", "40", "--max_redraws", "30"], "--least_samples"),
        (["-d", "cifar10", "-a", "0.1"], "pass --root DIR"),
        (["-d", "mnist", "-a", "0.1", "--root", "nowhere"], "put the torchvision files under"),
        (["-d", "emnist", "--emnist_split", "nope", "-a", "0.1", "--root", "."], "unknown EMNIST split"),
    ],
)
def test_bad_inputs_exit_2_with_one_line_and_leave_nothing(run, tmp_path: Path, args: list[str],
                                                           contains: str) -> None:
    result = run("partition", *args, "--out", str(tmp_path / "out" / "p.npz"))
    assert_user_error(result, contains=contains)
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_unwritable_output_is_a_user_error(run, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_user_error(run("partition", "-d", "digits", "--iid", "--out", str(blocker / "p.npz")),
                      contains="could not write")


def test_show_prints_clients_and_writes_png(run, tmp_path: Path) -> None:
    out = tmp_path / "p.npz"
    assert run("partition", "-d", "digits", "-c", "2", "-cn", "4", "--out", str(out), "--no-plot").exit_code == 0
    png = tmp_path / "show.png"
    result = run("show", str(out), "--png", str(png))
    assert result.exit_code == 0, result.output
    assert png.read_bytes().startswith(PNG_MAGIC)
    rows = [line for line in result.stdout.splitlines() if line.strip().startswith("│")]
    assert len(rows) == 4  # one per client
    assert all(line.split("│")[4].strip() == "2" for line in rows)  # labels present


def test_show_external_npz_needs_dataset_for_labels(run, tmp_path: Path) -> None:
    ext = tmp_path / "ext.npz"
    np.savez(ext, train_0=np.arange(0, 100), test_0=np.arange(100, 150), train_1=np.arange(150, 300),
             test_1=np.arange(300, 400))
    plain = run("show", str(ext))
    assert plain.exit_code == 0 and "pass -d DATASET" in plain.stdout
    labelled = run("show", str(ext), "-d", "digits", "--png", str(tmp_path / "ext.png"))
    assert labelled.exit_code == 0, labelled.output
    assert (tmp_path / "ext.png").read_bytes().startswith(PNG_MAGIC)
    assert_user_error(run("show", str(ext), "--png", str(tmp_path / "x.png")), contains="pass -d DATASET")


def test_show_shared_partition_with_mnist5k(run) -> None:
    path = SHARED / "mnist5k-d01-s42.npz"
    if not path.is_file():
        pytest.skip(f"shared partitions not present at {SHARED}")
    result = run("show", str(path), "-d", "mnist5k")
    assert result.exit_code == 0, result.output
    assert_user_error(run("show", str(path), "-d", "digits"), contains="has only 1797 samples")


def test_show_user_mistakes(run, tmp_path: Path) -> None:
    assert_user_error(run("show", str(tmp_path / "missing.npz")), contains="not found")
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    assert_user_error(run("show", str(bad)), contains="not a readable npz")
    out = tmp_path / "p.npz"
    assert run("partition", "-d", "digits", "--iid", "-cn", "3", "--out", str(out), "--no-plot").exit_code == 0
    assert_user_error(run("show", str(out), "-d", "mnist5k"), contains="made for dataset digits, not mnist5k")
