"""`fedcmd simulate` end to end through the real CLI, and its handling of user mistakes."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cloud.cli.main import app
from cloud.config import resolve
from cloud.run_output import WALL_CLOCK_COLUMNS, WALL_CLOCK_FIELDS
from cloud.sim.simulate import build_and_run

runner = CliRunner()
FAST = ["-jr", "0.1", "-ge", "4", "-le", "1", "-tg", "0", "--quiet"]


def test_same_command_twice_gives_the_same_metrics(shared_partition: Path) -> None:
    values = {
        "algo": "fedcmd",
        "dataset": "mnist5k",
        "partition": shared_partition,
        "join_ratio": 0.1,
        "global_epoch": 4,
        "local_epoch": 1,
        "seed": 5,
        "test_gap": 0,
        "hp": {"selection_rounds": 2},
    }
    a = build_and_run(resolve({}, dict(values)))
    b = build_and_run(resolve({}, dict(values)))
    assert [r.clients for r in a.records] == [r.clients for r in b.records]
    # Accuracies are counts and must match exactly; summed losses may differ in the last bits
    # (oneDNN picks kernels by buffer alignment), far below the 6 decimals metrics.csv keeps.
    for ra, rb in zip([*a.records, a], [*b.records, b]):
        ma = ra.metrics if hasattr(ra, "metrics") else ra.final
        mb = rb.metrics if hasattr(rb, "metrics") else rb.final
        assert ma.keys() == mb.keys()
        for k in ma:
            assert ma[k] == (mb[k] if k.endswith("_acc") else pytest.approx(mb[k], rel=1e-7)), k
    c = build_and_run(resolve({}, {**values, "seed": 6}))
    assert [r.metrics for r in a.records] != [r.metrics for r in c.records]


def _without_wall_clock(folder: Path) -> tuple[list[str], list[str]]:
    """metrics.csv and summary.json as text, the documented wall-clock values blanked (and only those)."""
    lines = (folder / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    wall = [header.index(c) for c in WALL_CLOCK_COLUMNS]
    csv_rows = [lines[0]]
    for line in lines[1:]:
        fields = line.split(",")  # our metrics.csv never quotes: a plain split is exact
        assert len(fields) == len(header) and all(fields[i] for i in wall), line
        csv_rows.append(",".join("<wall>" if i in wall else f for i, f in enumerate(fields)))
    pattern = re.compile(r'^  "(?:{})": [^,]+(,?)$'.format("|".join(WALL_CLOCK_FIELDS)))
    summary_lines = (folder / "summary.json").read_text().splitlines()
    masked = [pattern.sub(r"<wall>\1", line) for line in summary_lines]
    assert sum(m != line for m, line in zip(masked, summary_lines)) == len(WALL_CLOCK_FIELDS)
    return csv_rows, masked


def test_same_command_in_two_processes_writes_the_same_run_folder(tmp_path: Path) -> None:
    """What a user sees: one command run twice (two processes at once) gives identical metrics.csv and
    summary.json except the wall-clock values README names, byte counts included (an update carries its
    wall-clock fit_seconds; before fixed-width header floats its digits changed bytes_up)."""
    exe = Path(sys.executable).with_name("fedcmd")
    args = [
        "simulate",
        "--algo",
        "fedcmd",
        "-d",
        "synthetic",
        "-m",
        "2nn",
        "-cn",
        "6",
        "-jr",
        "1",
        "-ge",
        "3",
        "-le",
        "1",
        "-tg",
        "0",
        "--hp",
        "selection_rounds=1",
        "--seed",
        "5",
        "--save_fig",
        "0",
        "--quiet",
    ]
    outs = [tmp_path / "a", tmp_path / "b"]
    procs = [
        subprocess.Popen(
            [str(exe), *args, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for out in outs
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    (csv_a, summary_a), (csv_b, summary_b) = (_without_wall_clock(out) for out in outs)
    assert len(csv_a) == 4  # header + 3 rounds
    assert csv_a == csv_b
    assert summary_a == summary_b
    assert json.loads((outs[0] / "summary.json").read_text())["bytes_up"] > 0


def test_simulate_writes_a_complete_run_folder(tmp_path: Path, shared_partition: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "simulate",
            "--algo",
            "fedcmd",
            "-d",
            "mnist5k",
            "--partition",
            str(shared_partition),
            *FAST,
            "--hp",
            "selection_rounds=2",
            "--save_model",
            "1",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy.png",
        "config.json",
        "metrics.csv",
        "model.safetensors",
        "run.log",
        "summary.json",
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"]["chosen_layer"] in ("fc1", "fc2", "classifier")
    assert sum(summary["strategy"]["vote_counts"].values()) > 0
    assert 0 < summary["final_personalized_acc"] <= 100
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["round"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["phase"] for r in rows] == ["select", "select", "personal", "personal"]
    accs = [float(r["test_before_acc"]) for r in rows[-10:]]
    assert summary["paper_metric"] == pytest.approx(np.mean(accs), abs=1e-4)
    assert all(int(r["bytes_down"]) > 0 and int(r["bytes_up"]) > 0 for r in rows)
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["hp"] == {"selection_rounds": 2}
    # refuses to overwrite without --force
    again = runner.invoke(app, ["simulate", "--partition", str(shared_partition), *FAST, "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output


def test_config_file_then_cli_overrides(tmp_path: Path, shared_partition: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'algo = "fedcmd"\ndataset = "mnist5k"\npartition = "{shared_partition}"\nglobal_epoch = 9\n'
        'join_ratio = 0.1\nlocal_epoch = 1\ntest_gap = 0\n[fedcmd]\nselection_rounds = 1\nbody_mode = "relay"\n'
    )
    out = tmp_path / "o"
    result = runner.invoke(app, ["simulate", "--config", str(cfg), "-ge", "2", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["global_epoch"] == 2 and resolved["hp"] == {"selection_rounds": 1, "body_mode": "relay"}


def _bad(args: list[str], tmp_path: Path, needle: str) -> None:
    out = tmp_path / "never"
    result = runner.invoke(app, ["simulate", *args, "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not any(p.name.startswith(".never") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--algo", "fedmagic"], "unknown algorithm 'fedmagic'"),
        (["-d", "imagenet21k"], "imagenet21k"),
        (["-m", "vgg"], "unknown model 'vgg'"),
        (["-a", "-1"], "alpha"),
        (["-jr", "1.5"], "join_ratio"),
        (["--hp", "tau=0"], "tau"),
        (["--hp", "body_mode=serial"], "body_mode"),
        (["-d", "mnist5k", "-cn", "100", "-ls", "60"], "least_samples"),
        (["--partition", "/nonexistent/p.npz"], "does not exist"),
        (["--external_model_params_file", "/tmp/weights.pt"], "safetensors"),
        (["-d", "cifar10", "--root", "/nonexistent/root"], "/nonexistent/root"),
        (["-d", "synthetic"], "-m 2nn"),
    ],
)
def test_user_mistakes_get_one_line_and_exit_2(args: list[str], needle: str, tmp_path: Path) -> None:
    _bad(args, tmp_path, needle)


def test_bad_config_files(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("global_epochs = 3\n")
    _bad(["--config", str(unknown)], tmp_path, "global_epochs")
    wrong_type = tmp_path / "type.toml"
    wrong_type.write_text('global_epoch = "many"\n')
    _bad(["--config", str(wrong_type)], tmp_path, "global_epoch")
    broken = tmp_path / "broken.toml"
    broken.write_text("global_epoch = = 3\n")
    _bad(["--config", str(broken)], tmp_path, "not valid TOML")


def test_partition_from_another_dataset_is_refused(tmp_path: Path, shared_partition: Path) -> None:
    _bad(["-d", "digits", "--partition", str(shared_partition)], tmp_path, "mnist")


def test_console_script_runs_and_seed_spellings_work(tmp_path: Path, shared_partition: Path) -> None:
    exe = Path(sys.executable).with_name("fedcmd")
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            str(exe),
            "simulate",
            "--algo",
            "fedavg",
            "-d",
            "mnist5k",
            "--partition",
            str(shared_partition),
            "--join_ratio",
            "0.1",
            "--global_epoch",
            "2",
            "--local_epoch",
            "1",
            "--test_gap",
            "0",
            "--quiet",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "paper metric" in proc.stdout
    cmp = subprocess.run([str(exe), "compare", str(out)], capture_output=True, text=True, timeout=60)
    assert cmp.returncode == 0 and "fedavg" in cmp.stdout


def test_eval_flags_choose_the_splits(shared_partition: Path) -> None:
    base = {
        "algo": "fedavg",
        "dataset": "mnist5k",
        "partition": shared_partition,
        "join_ratio": 0.1,
        "global_epoch": 1,
        "local_epoch": 1,
        "test_gap": 0,
    }
    both = build_and_run(resolve({}, {**base, "eval_train": True}))
    assert {"test_before_acc", "train_before_acc", "train_after_acc"} <= both.records[0].metrics.keys()
    train_only = build_and_run(resolve({}, {**base, "eval_test": False, "eval_train": True}))
    assert "test_before_acc" not in train_only.records[0].metrics
    assert "train_after_acc" in train_only.records[0].metrics


def test_stragglers_external_weights_and_global_testset(tmp_path: Path, shared_partition: Path) -> None:
    from safetensors.numpy import save_file

    from fedcmd_core.models import build_model
    from fedcmd_core.params import model_arrays
    from protocols.codec import decode
    from protocols.memory import MemoryTransport

    base = {
        "algo": "fedavg",
        "dataset": "mnist5k",
        "partition": shared_partition,
        "join_ratio": 0.1,
        "global_epoch": 2,
        "local_epoch": 3,
        "test_gap": 0,
        "seed": 2,
    }
    transport = MemoryTransport()
    epochs: list[int] = []

    def on_task(topic: str, payload: bytes) -> None:
        header = decode(payload)[0]
        if header.kind == "fit":
            epochs.append(header.payload["local_epoch"])

    transport.subscribe("fedcmd/+/client/+/task", on_task)
    build_and_run(resolve({}, {**base, "straggler_ratio": 1.0, "straggler_min_local_epoch": 1}), transport=transport)
    assert epochs and all(1 <= e < 3 for e in epochs)

    weights = model_arrays(build_model("lenet5", (1, 28, 28), 10, seed=123))
    weights = {k: (np.zeros_like(v) if k.startswith("classifier.") else v) for k, v in weights.items()}
    path = tmp_path / "init.safetensors"
    save_file(weights, str(path))
    zero_head = build_and_run(resolve({}, {**base, "global_epoch": 1, "external_model_params_file": path}))
    # an all-zero classifier predicts class 0 for everything: accuracy = share of 0s in the round's test sets
    round0 = zero_head.records[0]
    labels = np.concatenate([np.load(shared_partition)[f"test_{c}"] for c in round0.clients])
    from fedcmd_core.data import load_dataset

    y = load_dataset("mnist5k").y.numpy()
    assert round0.metrics["test_before_acc"] == pytest.approx(100 * np.mean(y[labels] == 0))

    glob = build_and_run(resolve({}, {**base, "global_epoch": 1, "global_testset": True}))
    assert glob.records[0].metrics["test_before_loss"] > 0 and glob.final["test_before_acc"] > 0
