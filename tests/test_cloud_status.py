"""`fedcmd cloud status` reads the coordinator's retained status from a real broker."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cloud.cli import app
from protocols.mqtt import MqttTransport
from protocols.topics import status_topic


def test_status_prints_the_retained_status(mosquitto_broker) -> None:
    status = {"state": "running", "next_round": 3, "global_epoch": 10, "online": 4, "rejected": {"duplicate": 1},
              "run": {"algo": "fedcmd", "hp": {"body_mode": "relay"}}}
    with MqttTransport(mosquitto_broker.url, "test-coordinator") as t:
        t.publish(status_topic("lab"), json.dumps(status).encode(), retain=True)
    result = CliRunner().invoke(app, ["cloud", "status", "--broker", mosquitto_broker.url, "--fleet", "lab"])
    assert result.exit_code == 0, result.output
    assert "running" in result.output and "fedcmd" in result.output and "duplicate" in result.output
    missing = CliRunner().invoke(
        app, ["cloud", "status", "--broker", mosquitto_broker.url, "--fleet", "other", "--timeout", "1"]
    )
    assert missing.exit_code == 2 and "no coordinator status for fleet 'other'" in missing.output


def test_the_shipped_example_config_is_valid() -> None:
    from pathlib import Path

    from cloud.serve import load_serve_config
    from fedcmd_core.runspec import build_server

    cfg = load_serve_config(Path(__file__).resolve().parents[1] / "deploy" / "cloud.example.toml")
    assert cfg.run.algo == "fedcmd" and cfg.run.hp["server_lr"] == 8.0
    server = build_server(cfg.run)
    assert server.params.max_staleness == 1


def test_bad_serve_config_is_one_line(tmp_path) -> None:
    bad = tmp_path / "cloud.toml"
    bad.write_text('fleet = "lab"\nrounds = 3\n[run]\nalgo = "fedcmd"\ninput_shape = [1, 28, 28]\nnum_classes = 10\n'
                   "num_clients = 5\nglobal_epoch = 2\n")
    result = CliRunner().invoke(app, ["cloud", "serve", "--config", str(bad)])
    assert result.exit_code == 2 and "rounds" in result.output and "Traceback" not in result.output
