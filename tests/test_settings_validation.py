"""One validated settings model for cloud.toml's [run] and `fedcmd simulate`: bounds, strict types, one
line naming the field, exit 2 for every configuration mistake and 3 only for retryable ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloud.cli.main import app
from cloud.config import ConfigError, RunConfig, resolve
from cloud.service.serve import ServeConfig, load_serve_config
from fedcmd_core.runspec import RunSpec, TrainingSettings, build_server

FEDCMD = Path(sys.executable).parent / "fedcmd"
RUN = {"algo": "fedavg", "input_shape": [1, 28, 28], "num_classes": 10, "num_clients": 5, "global_epoch": 2}


def _toml(value: object) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # JSON scalars and lists are TOML too


def _cloud_toml(tmp_path: Path, top: dict[str, object] | None = None, **run: object) -> Path:
    paths = {"checkpoint": str(tmp_path / "ckpt.safetensors"), "out": str(tmp_path / "out")}
    lines = ['fleet = "lab"'] + [f"{k} = {_toml(v)}" for k, v in {**paths, **(top or {})}.items()]
    lines += ["[run]"] + [f"{k} = {_toml(v)}" for k, v in {**RUN, **run}.items()]
    path = tmp_path / "cloud.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_both_settings_models_share_one_base() -> None:
    assert issubclass(RunSpec, TrainingSettings) and issubclass(RunConfig, TrainingSettings)
    for name in ("global_epoch", "local_epoch", "batch_size", "local_lr", "aggregation", "trim_ratio", "clip_factor"):
        assert RunSpec.model_fields[name].metadata == RunConfig.model_fields[name].metadata, name


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("global_epoch", -1, "run.global_epoch: Input should be greater than or equal to 1 (got -1)"),
        ("local_epoch", -3, "run.local_epoch: Input should be greater than or equal to 0 (got -3)"),
        ("batch_size", -1, "run.batch_size: Input should be greater than or equal to 1 (got -1)"),
        ("local_lr", -0.5, "run.local_lr: Input should be greater than 0 (got -0.5)"),
        ("momentum", -0.1, "run.momentum: Input should be greater than or equal to 0"),
        ("num_classes", 0, "run.num_classes: Input should be greater than or equal to 2 (got 0)"),
        ("num_classes", 1_000_000_000, "run.num_classes: Input should be less than or equal to 100000"),
        ("num_classes", 1e9, "run.num_classes: Input should be a valid integer (got 1000000000.0); write a whole"),
        ("num_clients", 0, "run.num_clients: Input should be greater than or equal to 1"),
        ("batch_size", "2", "run.batch_size: Input should be a valid integer (got '2'); write the value without"),
        ("global_epoch", True, "run.global_epoch: Input should be a valid integer (got True)"),
        ("eval_test", 1, "run.eval_test: Input should be a valid boolean (got 1)"),
        ("local_lr", "0.1", "run.local_lr: Input should be a valid number (got '0.1')"),
        ("input_shape", [], "run.input_shape: Tuple should have at least 1 item"),
        ("input_shape", [1, 0, 28], "run.input_shape.1: Input should be greater than or equal to 1 (got 0)"),
        ("input_shape", [1, 2, 3, 4, 5], "run.input_shape: Tuple should have at most 4 items"),
        ("input_shape", [3, 4096, 4096], "more than the 1048576 allowed"),
        ("input_shape", ["1", 28, 28], "run.input_shape.0: Input should be a valid integer (got '1')"),
        ("aggregation", "mode", "run.aggregation: Input should be 'mean', 'trimmed_mean' or 'median'"),
        ("trim_ratio", 0.5, "run.trim_ratio: Input should be less than 0.5 (got 0.5)"),
        ("clip_factor", -1, "run.clip_factor: Input should be greater than or equal to 0 (got -1)"),
        ("model", "lenet7", "unknown model 'lenet7'"),
        ("algo", "fedfoo", "unknown algorithm 'fedfoo'"),
        ("hp", {"share_bn_stats": "x"}, "run: bad hyper-parameter for fedavg: share_bn_stats: "
                                         "Input should be a valid boolean, unable"),
        ("hp", {"selection_rounds": 2}, "run: bad hyper-parameter for fedavg: selection_rounds: "
                                         "unknown key (valid: share_bn_stats)"),
        ("rounds", 3, "run.rounds: unknown setting"),
    ],
)
def test_cloud_toml_run_values_are_checked(tmp_path: Path, key: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_serve_config(_cloud_toml(tmp_path, **{key: value}))
    message = str(caught.value)
    assert expected in message and "\n" not in message, message


def test_good_values_and_json_round_trip() -> None:
    # an int is a fine float; the retained status carries lists for tuples
    spec = RunSpec(**{**RUN, "local_lr": 1, "aggregation": "trimmed_mean", "trim_ratio": 0.2, "clip_factor": 0})
    assert spec.local_lr == 1.0 and spec.input_shape == (1, 28, 28)
    again = RunSpec.model_validate_json(json.dumps(spec.model_dump(mode="json")))
    assert again == spec
    server = build_server(spec)
    assert server.ctx.aggregation == "trimmed_mean" and server.ctx.trim_ratio == 0.2


def test_serve_cli_exit_codes_are_2_for_mistakes(tmp_path: Path) -> None:
    cases = [
        ({}, {"global_epoch": -1}, "run.global_epoch"),
        ({}, {"batch_size": "2"}, "without quotes"),
        ({}, {"input_shape": [28, 28]}, "input_shape [28, 28] does not fit model 'lenet5'"),  # was a traceback
        ({"broker": "http://127.0.0.1:1883"}, {}, "broker: must be mqtt://host:port"),  # was exit 3
        ({"checkpoint": str(tmp_path)}, {}, "is a folder; give a file path"),  # was caught after round 1
        ({"min_clients": "2"}, {}, "min_clients: Input should be a valid integer"),
        ({}, {"hp": {"share_bn_stats": "x"}}, "bad hyper-parameter for fedavg: share_bn_stats"),  # was 4 lines
        ({}, {"hp": {"share_bn_stat": True}}, "did you mean 'share_bn_stats'?"),
        ({}, {"rounds": 3}, "run.rounds: unknown setting"),
    ]
    for top, run, expected in cases:
        result = CliRunner().invoke(app, ["cloud", "serve", "--config", str(_cloud_toml(tmp_path, top, **run))])
        assert result.exit_code == 2, (top, run, result.output)
        assert expected in result.output and "Traceback" not in result.output, (top, run, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_simulate_rejects_the_same_mistakes(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    for body, expected in (
        ("global_epoch = -1\n", "global_epoch: Input should be greater than or equal to 1"),
        ('global_epoch = "2"\n', "global_epoch: Input should be a valid integer (got '2')"),
        ("client_num = 2.0\n", "client_num: Input should be a valid integer"),
        ("trim_ratio = 0.6\n", "trim_ratio: Input should be less than 0.5"),
        (f'checkpoint = "{tmp_path}"\n', "is a folder; give a file path"),
        ('broker = "http://x:1883"\n', "broker: must be 'auto' or mqtt://host:port"),
    ):
        cfg.write_text(body)
        result = CliRunner().invoke(app, ["simulate", "--config", str(cfg), "--out", str(tmp_path / "o")])
        assert result.exit_code == 2 and expected in result.output, (body, result.output)
    for flags, expected in (
        (["--trim-ratio", "0.7"], "trim_ratio"),
        (["--clip-factor", "-1"], "clip_factor"),
        (["--aggregation", "mode"], "aggregation"),
        (["--attack", "flood"], "attack"),
        (["--attackers", "-1"], "attackers"),
        (["--checkpoint", str(tmp_path)], "is a folder"),
    ):
        result = CliRunner().invoke(app, ["simulate", *flags, "--out", str(tmp_path / "o")])
        assert result.exit_code == 2 and expected in result.output, (flags, result.output)


def test_simulate_flags_reach_the_settings() -> None:
    cfg = resolve({}, {"aggregation": "median", "trim_ratio": 0.2, "clip_factor": 0.0, "attackers": 2,
                       "attack": "signflip", "attack_scale": 10.0})
    assert (cfg.aggregation, cfg.trim_ratio, cfg.clip_factor) == ("median", 0.2, 0.0)
    assert (cfg.attackers, cfg.attack, cfg.attack_scale) == (2, "signflip", 10.0)
    assert isinstance(ServeConfig(run=RUN).run.clip_factor, float)


def test_simulate_mqtt_with_an_unreachable_broker_is_one_line_exit_3(tmp_path: Path) -> None:
    from protocols.broker import free_port

    result = subprocess.run(
        [str(FEDCMD), "simulate", "--algo", "fedavg", "-d", "synthetic", "-m", "2nn", "-cn", "4", "-ge", "1", "--quiet",
         "--transport", "mqtt", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot connect to the MQTT broker"), result.stderr
    assert not (tmp_path / "o").exists()
