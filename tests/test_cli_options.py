"""One boolean convention (--flag, --no-flag, --flag 1/0) everywhere; partition schemes that conflict are
errors; [hp.<algo>] tables let one config serve several algorithms; mistyped keys get a suggestion and the
valid list; simulate prints every round (the last partial block too), records what it used in config.json,
and a failed run leaves no empty folders behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from cloud.cli.apps import normalise_booleans
from cloud.cli.main import app
from cloud.cli.tables import ROUND_COLUMNS
from cloud.config import ConfigError, resolve
from cloud.term_tables import AdaptiveTable

runner = CliRunner()
SIMULATE = typer.main.get_command(app).commands["simulate"]
TINY = ["-d", "digits", "-cn", "4", "-ls", "5", "-jr", "0.5", "-ge", "2", "-le", "1", "-tg", "0"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["--save_model", "1"], ["--save_model"]),
        (["--save_model", "0"], ["--no-save-model"]),
        (["--save-model=yes"], ["--save-model"]),
        (["--no-save-fig", "1"], ["--no-save-fig"]),
        (["--no-save-fig", "0"], ["--save-fig"]),
        (["-ee", "false", "-ge", "1"], ["--no-eval-test", "-ge", "1"]),
        (["--force", "0", "--quiet", "TRUE"], ["--quiet"]),  # a flag without an off spelling: 0 drops it
        (["--iid", "-a", "1"], ["--iid", "-a", "1"]),  # the value of -a is not a boolean word of --iid
        (["--", "--iid", "1"], ["--", "--iid", "1"]),
    ],
)
def test_seed_boolean_spellings_become_flags(given: list[str], expected: list[str]) -> None:
    assert normalise_booleans(SIMULATE, given) == expected


def test_every_boolean_option_has_an_off_spelling_or_is_off_by_default() -> None:
    def walk(cmd):
        yield cmd
        for sub in getattr(cmd, "commands", {}).values():
            yield from walk(sub)

    for cmd in walk(typer.main.get_command(app)):
        for p in cmd.params:
            if getattr(p, "is_bool_flag", False) and p.name not in ("help", "install_completion", "show_completion"):
                assert p.secondary_opts or p.default is False, (cmd.name, p.opts)


def test_bad_boolean_word_is_one_usage_error() -> None:
    result = runner.invoke(app, ["simulate", "--save_model=maybe"])
    assert result.exit_code == 2 and "is not a boolean" in result.output


def test_partition_schemes_conflict() -> None:
    with pytest.raises(ConfigError, match=r"-a/--alpha 0.3 \(Dirichlet\) and --iid"):
        resolve({}, {"alpha": 0.3, "iid": True})
    with pytest.raises(ConfigError, match="--iid and -s/--shards"):
        resolve({}, {"iid": True, "shards": 2})
    assert resolve({}, {"iid": True}).alpha == 0.0  # --iid alone replaces the default Dirichlet split
    assert resolve({}, {"classes": 2}).alpha == 0.0
    assert resolve({}, {}).alpha == 0.1
    result = runner.invoke(app, ["simulate", "-a", "0.1", "--iid", "--out", "never"])
    assert result.exit_code == 2 and "two partition schemes" in result.output and "Traceback" not in result.output


def test_one_config_file_serves_several_algorithms() -> None:
    file = {"global_epoch": 3, "hp": {"fedcmd": {"selection_rounds": 6}, "pfedsim": {"warmup_round": 0.3}},
            "fedavg": {"share_bn_stats": False}}  # the [<algo>] spelling too
    assert resolve(file, {}).hp == {"selection_rounds": 6}
    assert resolve(file, {"algo": "pfedsim"}).hp == {"warmup_round": 0.3}
    assert resolve(file, {"algo": "fedavg"}).hp == {"share_bn_stats": False}
    assert resolve(file, {"algo": "local"}).hp == {}
    assert resolve(file, {"algo": "pfedsim", "hp": {"warmup_round": 0.5}}).hp == {"warmup_round": 0.5}
    # every table is checked, whichever algorithm runs
    with pytest.raises(ConfigError, match=r"\[hp.pfedsim\].*warmup_rounds: unknown key; did you mean 'warmup_round'"):
        resolve({"hp": {"pfedsim": {"warmup_rounds": 0.3}}}, {"algo": "fedcmd"})
    with pytest.raises(ConfigError, match=r"\[hp.fedcdm\]: unknown algorithm 'fedcdm'; did you mean 'fedcmd'"):
        resolve({"hp": {"fedcdm": {}}}, {})


@pytest.mark.parametrize(
    ("file", "cli", "needle"),
    [
        ({"global_epochs": 3}, {}, "global_epochs: unknown setting; did you mean 'global_epoch'? (valid: "),
        ({}, {"hp": {"selection_round": 6}}, "selection_round: unknown key; did you mean 'selection_rounds'? (valid: "),
        ({}, {"algo": "fedcdm"}, "unknown algorithm 'fedcdm'; did you mean 'fedcmd'?"),
    ],
)
def test_mistyped_keys_get_a_suggestion_and_the_valid_list(file: dict, cli: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        resolve(file, cli)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).count("fedcdm") <= 1  # the unknown name is named once


def test_a_run_prints_every_round_records_what_it_used_and_honours_the_flags(tmp_path: Path) -> None:
    part = tmp_path / "p.npz"
    made = runner.invoke(app, ["data", "partition", "-d", "digits", "-cn", "4", "-a", "0.5", "-ls", "5",
                               "--out", str(part), "--plot", "0"])
    assert made.exit_code == 0, made.output
    out = tmp_path / "run"
    result = runner.invoke(app, ["simulate", "--algo", "fedavg", "--partition", str(part), *TINY[6:],
                                 "-d", "digits", "--save_model", "1", "--save-fig", "0", "--no-save-log",
                                 "--eval_train", "yes", "--out", str(out)], terminal_width=120)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.csv", "model.safetensors",
                                                     "summary.json"]
    # -ge 2 with the default -vg 10: both rows are printed at the end
    rows = [line.split("│")[0].strip() for line in result.output.splitlines() if "│" in line and "train" in line]
    assert rows == ["1", "2"], result.output
    config = json.loads((out / "config.json").read_text())
    # the partition's own settings, not this command's defaults (20 clients, alpha 0.1, least 20)
    assert (config["client_num"], config["alpha"], config["least_samples"]) == (4, 0.5, 5)
    assert config["partition_scheme"] == "dirichlet" and config["eval_train"] is True


def test_a_failed_run_leaves_no_empty_folders(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "run"
    result = runner.invoke(app, ["simulate", "-d", "synthetic", "-ge", "1", "--out", str(out)])  # lenet5 on vectors
    assert result.exit_code == 2 and "-m 2nn" in result.output
    assert list(tmp_path.iterdir()) == []


def test_wide_tables_fit_the_terminal() -> None:
    """The round table and bench fleet's table: whole values at any width (full names, short names and a
    legend, or one block per row), never a cut `fed…` column."""
    from rich.console import Console

    from cloud.bench.fleet import add_ratios, render

    rounds = AdaptiveTable(ROUND_COLUMNS, [["12", "personal", "97.25", "98.00", "0.0712", "426", "428", "0.74"]],
                           edge=False)
    row = {"algo": "fedcmd_noweight", "codec": "none", "round_s": 3.0, "train_s": 2.0, "aggregate_s": 0.01,
           "transfer_s": 0.2, "bytes_down": 4.0e5, "bytes_up": 4.0e5, "messages": 40.0, "coordinator_rss_mb": 300.0,
           "worker_rss_mb": 500.0, "agents_per_worker": 50.0}
    fleet_rows = [dict(row), {**row, "algo": "fedavg"}]
    add_ratios(fleet_rows)
    fleet = render(fleet_rows, 100, 10, 3)
    for table, cases in ((rounds, ((120, "acc before", "full"), (60, "acc0", "short"), (30, "acc0:", "rows"))),
                         (fleet, ((250, "coordinator RSS MB", "full"), (80, "fedcmd_noweight", "rows")))):
        for width, expect, layout in cases:
            console = Console(width=width, record=True)
            console.print(table)
            text = console.export_text()
            assert table.layout(width) == layout and expect in text and "…" not in text, (width, text)
            assert max(len(line) for line in text.splitlines()) <= width
