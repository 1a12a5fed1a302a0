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
