"""Help that tells the truth: every command's --help renders every bracketed word of its help texts (rich
markup used to swallow `[run]`, `[hp.<algo>]`, `[default: ...]`), every option is described, simulate shows
RunConfig's real defaults, the name lists equal the registries, and `fedcmd algorithms` prints each
algorithm's hyper-parameters from its Params model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from cloud.cli.main import app
from cloud.config import RunConfig

runner = CliRunner()
ROOT = typer.main.get_command(app)


def _walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _walk(sub, (*path, name))


COMMANDS = list(_walk(ROOT))


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_the_tree_is_whole() -> None:
    names = {" ".join(p) for p, _ in COMMANDS}
    for expected in ("simulate", "experiment", "algorithms", "data partition", "data show", "data list",
                     "cloud serve", "cloud status", "bench kernels", "bench fleet", "deploy certs"):
        assert expected in names


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "fedcmd")
def test_help_keeps_every_bracketed_word_and_describes_every_option(path: tuple[str, ...]) -> None:
    command = dict(COMMANDS)[path]
    result = runner.invoke(app, [*path, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    shown = _flat(result.output)
    texts = [command.help or ""]
    for param in command.params:
        texts.append(getattr(param, "help", None) or "")
        if getattr(param, "help", None) is None and param.param_type_name == "option" and param.name != "help":
            pytest.fail(f"{' '.join(path)}: option {param.opts[0]} has no help text")
    bracketed = {b for t in texts for b in re.findall(r"\[[^\]\s][^\]]*\]", _flat(t))}
    for word in bracketed:
        assert word in shown, f"{' '.join(path)}: {word!r} vanished from --help"


def test_simulate_help_shows_runconfigs_defaults() -> None:
    shown = _flat(runner.invoke(app, ["simulate", "--help"], terminal_width=200).output)
    for flag, field in (("--join-ratio", "join_ratio"), ("--global-epoch", "global_epoch"), ("--alpha", "alpha"),
                        ("--least-samples", "least_samples"), ("--local-lr", "local_lr"), ("--seed", "seed"),
                        ("--clip-factor", "clip_factor"), ("--optimizer", "optimizer")):
        default = RunConfig.model_fields[field].default
        section = shown[shown.index(flag):]
        assert f"[default: {default}]" in section[:400], (flag, section[:400])
    assert "[default: no-save-model]" in shown and "[default: save-fig]" in shown


def test_name_lists_are_the_registries() -> None:
    from fedcmd_core import names, strategies
    from fedcmd_core.models import MODEL_ALIASES, MODELS
    from fedcmd_core.names import ALGORITHM_NAMES, MODEL_NAMES
    from fedcmd_core.strategies import BUILTIN

    assert names.ALGORITHM_ALIASES == strategies.ALIASES and names.MODEL_ALIASES == MODEL_ALIASES
    assert names.ENTRY_POINT_GROUP == strategies.ENTRY_POINT_GROUP

    assert tuple(BUILTIN) == ALGORITHM_NAMES and tuple(MODELS) == MODEL_NAMES
    shown = _flat(runner.invoke(app, ["simulate", "--help"], terminal_width=200).output)
    assert all(name in shown for name in ALGORITHM_NAMES)


def test_algorithms_prints_every_hyper_parameter_with_its_default() -> None:
    from fedcmd_core.strategies import BUILTIN

    result = runner.invoke(app, ["algorithms"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name, record in BUILTIN.items():
        assert re.search(rf"^{re.escape(name)}  \S", result.output, re.M), name
        for key, field in record.params.model_fields.items():
            assert re.search(rf"^\s*{re.escape(key)}\s+{re.escape(repr(field.default))}\s", result.output, re.M), \
                (name, key)
    one = runner.invoke(app, ["algorithms", "pfedsim"], terminal_width=200)
    assert "warmup_round" in one.output and "fedcmd " not in one.output
    typo = runner.invoke(app, ["algorithms", "fedcdm"])
    assert typo.exit_code == 2 and "did you mean 'fedcmd'?" in typo.output


def test_version_and_completion() -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"fedcmd {version('fedcmd')}"
    # typer picks the shell from the parent processes (shellingham); under `make` that is sh, which it does not
    # support, so the shell is named explicitly, the way typer's own tests do, in a fresh process
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    script = subprocess.run([str(Path(sys.executable).with_name("fedcmd")), "--show-completion", "bash"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert script.returncode == 0 and "_FEDCMD_COMPLETE" in script.stdout, (script.stdout, script.stderr)
