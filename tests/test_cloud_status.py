"""`fedcmd cloud status` reads the coordinator's retained status from a real broker."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cloud.cli.main import app
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

    from cloud.service.serve import load_serve_config
    from fedcmd_core.runspec import build_server

    cfg = load_serve_config(Path(__file__).resolve().parents[1] / "deploy" / "cloud.example.toml")
    assert cfg.run.algo == "fedcmd" and cfg.run.hp["server_lr"] == 8.0
    server = build_server(cfg.run)
    assert server.params.max_staleness == 1 and server.params.server_momentum == 0.3


def test_bad_serve_config_is_one_line(tmp_path) -> None:
    bad = tmp_path / "cloud.toml"
    bad.write_text('fleet = "lab"\nrounds = 3\n[run]\nalgo = "fedcmd"\ninput_shape = [1, 28, 28]\nnum_classes = 10\n'
                   "num_clients = 5\nglobal_epoch = 2\n")
    result = CliRunner().invoke(app, ["cloud", "serve", "--config", str(bad)])
    assert result.exit_code == 2 and "rounds" in result.output and "Traceback" not in result.output


def test_unreachable_broker_or_missing_credentials_are_one_line(tmp_path) -> None:
    from protocols.broker import free_port

    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    down = CliRunner().invoke(app, ["cloud", "status", "--broker", url, "--timeout", "1"])
    assert down.exit_code == 3 and "cannot connect to the MQTT broker" in down.output  # retryable
    assert "Traceback" not in down.output
    missing = CliRunner().invoke(app, ["cloud", "status", "--broker", url, "--password-file", str(tmp_path / "nope"),
                                       "--username", "observer"])
    assert missing.exit_code == 2 and "cannot read the password file" in missing.output
    no_ca = CliRunner().invoke(app, ["cloud", "status", "--broker", url, "--ca", str(tmp_path / "ca.crt")])
    assert no_ca.exit_code == 2 and "CA certificate" in no_ca.output and "does not exist" in no_ca.output


def test_agent_with_an_unreachable_broker_is_one_line(tmp_path, shared_partition) -> None:
    from edge_agent.cli import app as edge_app
    from protocols.broker import free_port

    result = CliRunner().invoke(edge_app, [
        "run", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--client-id", "0", "--data", str(shared_partition),
        "-d", "mnist5k", "--state-dir", str(tmp_path / "s"), "--wait", "1",
    ])
    assert result.exit_code == 3, result.output  # retryable: the broker may come up
    assert "cannot connect to the MQTT broker" in result.output and "Traceback" not in result.output
    bad_url = CliRunner().invoke(edge_app, [
        "run", "--broker", "http://127.0.0.1:1883", "--client-id", "0", "--data", str(shared_partition),
        "-d", "mnist5k", "--state-dir", str(tmp_path / "s"), "--wait", "1",
    ])
    assert bad_url.exit_code == 2 and "Traceback" not in bad_url.output, bad_url.output  # a setup mistake


def _serve_config(tmp_path, url: str, **extra: object) -> object:
    lines = ['fleet = "lab"', f'broker = "{url}"', f'out = "{tmp_path / "out"}"',
             f'checkpoint = "{tmp_path / "ckpt.safetensors"}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    lines += ["[run]", 'algo = "fedavg"', "input_shape = [1, 28, 28]", "num_classes = 10", "num_clients = 5",
              "global_epoch = 2"]
    path = tmp_path / "cloud.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _read_status(url: str) -> dict:
    got: dict = {}
    with MqttTransport(url, "status-probe") as t:
        t.subscribe(status_topic("lab"), lambda topic, p: got.update(json.loads(p)))
        t.run_until(lambda: bool(got), 5)
    return got


def test_serve_exit_codes_and_sigterm_leaves_status_stopped(tmp_path, mosquitto_broker) -> None:
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    fedcmd = Path(sys.executable).parent / "fedcmd"
    url = mosquitto_broker.url
    too_few = subprocess.run(
        [str(fedcmd), "cloud", "serve", "--config", str(_serve_config(tmp_path, url, wait_clients=1,
                                                                       registration_timeout=1.0))],
        capture_output=True, text=True, timeout=120,
    )
    assert too_few.returncode == 3, too_few.stderr  # retryable: a service manager restarts it
    assert "only 0 devices came online" in too_few.stderr and "Traceback" not in too_few.stderr
    assert _read_status(url)["state"] == "stopped"
    no_ca = subprocess.run(
        [str(fedcmd), "cloud", "serve", "--config", str(_serve_config(tmp_path, url, ca=str(tmp_path / "ca.crt")))],
        capture_output=True, text=True, timeout=120,
    )
    assert no_ca.returncode == 2 and "CA certificate" in no_ca.stderr and "does not exist" in no_ca.stderr

    config = _serve_config(tmp_path, url, wait_clients=1, registration_timeout=300.0)
    proc = subprocess.Popen([str(fedcmd), "cloud", "serve", "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _read_status(url).get("state") != "waiting":
            time.sleep(0.2)
        assert _read_status(url)["state"] == "waiting"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped (SIGTERM)" in out and "Traceback" not in err
    assert _read_status(url)["state"] == "stopped"
