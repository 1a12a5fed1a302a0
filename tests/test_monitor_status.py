"""`fedcmd cloud status --json` / `--watch` on a real broker, and the deploy files for Prometheus and Grafana
name only metrics the coordinator exports."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml
from typer.testing import CliRunner

from cloud.cli.main import app
from cloud.monitor import events as ev
from cloud.monitor.prometheus import PrometheusSink
from cloud.service.coordinator import RoundRecord
from protocols.mqtt import MqttTransport
from protocols.topics import status_topic

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
STATUS = {"state": "running", "fleet": "lab", "next_round": 3, "global_epoch": 10, "online": 4,
          "profiles": {"rpi4": 3, "x86": 1}, "rejected": {"duplicate": 2}, "unhealthy": 0, "incompatible": 0,
          "clipped": 1, "run": {"algo": "fedcmd", "hp": {"body_mode": "relay"}},
          "last_round": {"round": 3, "phase": "personal", "metrics": {"test_before_acc": 81.25}, "answered": 2,
                         "sampled": 3}}


def test_status_json_and_a_readable_table(mosquitto_broker) -> None:
    with MqttTransport(mosquitto_broker.url, "test-coordinator") as t:
        t.publish(status_topic("lab"), json.dumps(STATUS).encode(), retain=True)
    result = CliRunner().invoke(app, ["cloud", "status", "--broker", mosquitto_broker.url, "--fleet", "lab", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == STATUS
    table = CliRunner().invoke(app, ["cloud", "status", "--broker", mosquitto_broker.url, "--fleet", "lab"]).output
    assert "rpi4: 3, x86: 1" in table and "duplicate: 2" in table and "{" not in table  # no Python reprs
    assert "2 of 3 answered" in table and "81.25" in table


def test_status_watch_prints_every_new_status_until_ctrl_c(mosquitto_broker) -> None:
    with MqttTransport(mosquitto_broker.url, "test-coordinator") as t:
        t.publish(status_topic("lab"), json.dumps(STATUS).encode(), retain=True)
    proc = subprocess.Popen([str(Path(sys.executable).with_name("fedcmd")), "cloud", "status", "--broker",
                             mosquitto_broker.url, "--fleet", "lab", "--watch", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # SIGINT below must arrive even where the suite runs as a background job
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    try:
        end = time.monotonic() + 60
        while not lines and time.monotonic() < end:
            time.sleep(0.1)
        assert lines and json.loads(lines[0])["next_round"] == 3
        with MqttTransport(mosquitto_broker.url, "test-coordinator-2") as t:  # the coordinator moves on
            t.publish(status_topic("lab"), json.dumps({**STATUS, "next_round": 4}).encode(), retain=True)
        while len(lines) < 2 and time.monotonic() < end:
            time.sleep(0.1)
        assert [json.loads(x)["next_round"] for x in lines] == [3, 4]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    assert proc.returncode == 0, proc.stderr.read()


def _exported_names() -> set[str]:
    sink = PrometheusSink("lab")
    sink(ev.UpdateRejected(0, 1, "duplicate"))
    sink(ev.UpdateAccepted(0, 1, 10, 5))
    sink(ev.RoundStarted(0, "select", (1,), None, 1, time.time()))
    record = RoundRecord(0, "select", [1], {"test_before_acc": 50.0, "test_after_acc": 60.0}, 100, 10, 0.5, {}, [1])
    sink(ev.RoundClosed(record, {}, {"duplicate": 1}, time.time()))
    body, _ = sink.exposition()
    return {line.split("{")[0].split(" ")[0] for line in body.decode().splitlines() if line and line[0] != "#"}


def test_prometheus_and_grafana_files_use_only_exported_metrics() -> None:
    names = _exported_names()
    assert {"fedcmd_rounds_completed_total", "fedcmd_round_duration_seconds_bucket", "fedcmd_updates_accepted_total",
            "fedcmd_updates_rejected_total", "fedcmd_bytes_total", "fedcmd_devices", "fedcmd_paper_metric"} <= names
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = scrape["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["authorization"]["type"] == "Bearer"
    rules = yaml.safe_load((DEPLOY / "prometheus" / "fedcmd-alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads((DEPLOY / "grafana" / "fedcmd-coordinator.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bfedcmd_[a-z_]+", e)}
    assert used and used <= names, used - names
