"""The coordinator's one event stream and what it feeds: the run-folder writer, the dashboard's state,
Prometheus and TensorBoard agree on a real run (with a real fault: an attacker's rejected updates); the web
app is read-only, token-gated off loopback, streams live state, and ships its pinned chart library."""

from __future__ import annotations

import csv
import hashlib
import http.client
import json
import shutil
import socket
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cloud import run_output
from cloud.cli.main import app
from cloud.config import resolve
from cloud.monitor import events as ev
from cloud.monitor.config import MonitorConfig
from cloud.monitor.prometheus import PrometheusSink
from cloud.monitor.server import serve_state
from cloud.monitor.state import DashboardState, from_run_folders
from cloud.sim.simulate import build_and_run

STATIC = Path(__file__).resolve().parents[1] / "cloud" / "monitor" / "static"
# uPlot 1.6.32 from the npm registry (cloud/monitor/static/vendor/README.md): the vendored files, unchanged
VENDORED = {
    "uPlot.iife.min.js": "19c8d4c6ad88929a79f4ae49d6f7161566dfd0ba3d15cc495e974f787eb78f1f",
    "uPlot.min.css": "df630c6a8d6f8eeaff264b50f73ce5b114f646ffd9a0bb74f049b0a00135fa04",
    "uPlot.LICENSE": "8f989229699b4fe2f1a0432d0e9edc338a8a911e250e2d1b01ecd770a5f5b1bd",
}
TOKEN = "s3cret-token-of-the-test-0123"
RUN = {"algo": "fedcmd", "dataset": "digits", "client_num": 6, "join_ratio": 0.5, "global_epoch": 4,
       "local_epoch": 1, "test_gap": 0, "seed": 3, "hp": {"selection_rounds": 2},
       "attackers": 1, "attack": "nan"}  # the attacker's updates are rejected (non_finite): a fault that lands


def _prometheus_values(sink: PrometheusSink) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    body, _ = sink.exposition()
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "fleet")))] = s.value
    return out


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    bus = ev.EventBus()
    state = bus.subscribe(DashboardState("test run"))
    prom = bus.subscribe(PrometheusSink("sim"))
    seen: list[Any] = []
    bus.subscribe(seen.append)
    result = build_and_run(resolve({}, RUN), events=bus)
    folder = tmp_path_factory.mktemp("run")
    run_output.write_run(result, folder, "log")
    return {"result": result, "state": state, "prom": prom, "folder": folder, "events": seen}


def test_one_stream_feeds_the_run_folder_dashboard_and_prometheus_alike(watched_run: dict[str, Any]) -> None:
    folder, state, prom = watched_run["folder"], watched_run["state"], watched_run["prom"]
    summary = json.loads((folder / "summary.json").read_text())
    with (folder / "metrics.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == run_output.CSV_HEADER
        rows = list(reader)
    snap = state.snapshot()
    shown = snap["runs"][0]["rounds"]
    assert [r["round"] for r in shown] == [int(r["round"]) for r in rows] == [1, 2, 3, 4]
    for page, written in zip(shown, rows):
        assert page["test_before_acc"] == pytest.approx(float(written["test_before_acc"]), abs=1e-6)
        assert page["test_after_acc"] == pytest.approx(float(written["test_after_acc"]), abs=1e-6)
        assert (page["bytes_down"], page["bytes_up"]) == (int(written["bytes_down"]), int(written["bytes_up"]))
        assert page["answered"] == len(written["answered"].split())
    # the injected fault landed, and all three count it the same
    rejected = summary["rejected_updates"]
    assert rejected.get("non_finite", 0) > 0
    assert snap["rejected"] == rejected
    values = _prometheus_values(prom)
    assert values[("fedcmd_updates_rejected_total", (("reason", "non_finite"),))] == rejected["non_finite"]
    assert values[("fedcmd_rounds_completed_total", ())] == 4
    assert values[("fedcmd_bytes_total", (("direction", "up"),))] == summary["bytes_up"]
    assert values[("fedcmd_bytes_total", (("direction", "down"),))] == summary["bytes_down"]
    accepted = sum(len(r["answered"].split()) for r in rows)
    assert values[("fedcmd_updates_accepted_total", (("kind", "fit"),))] == accepted
    assert values[("fedcmd_updates_accepted_total", (("kind", "evaluate"),))] == 6  # the final evaluation
    assert values[("fedcmd_paper_metric", ())] == pytest.approx(summary["paper_metric"], abs=1e-9)
    assert values[("fedcmd_round_duration_seconds_count", ())] == 4
    assert values[("fedcmd_devices", (("state", "online"),))] == 6
    # the device table: every device online, the attacker's rejects on its row, rounds taken part in
    attacker = summary["attackers"]["devices"][0]
    devices = {d["client"]: d for d in snap["devices"]}
    assert set(devices) == set(range(6)) and all(d["state"] == "online" for d in devices.values())
    assert devices[attacker]["rejects"] == rejected["non_finite"]
    per_device = {c: sum(str(c) in r["answered"].split() for r in rows) for c in range(6)}
    assert {c: d["rounds"] for c, d in devices.items()} == per_device
    # FedCMD's vote and, after its selection rounds, the similarity matrix among the devices it holds
    assert snap["strategy"]["chosen_layer"] == summary["strategy"]["chosen_layer"]
    assert snap["strategy"]["vote_counts"] == summary["strategy"]["vote_counts"]
    sim = snap["strategy"]["similarity"]
    assert len(sim["matrix"]) == len(sim["clients"]) > 0 and all(len(r) == len(sim["clients"]) for r in sim["matrix"])
    assert snap["status"] == "finished"
    kinds = {type(e).__name__ for e in watched_run["events"]}
    assert kinds == {"Presence", "RunStarted", "RoundStarted", "UpdateAccepted", "UpdateRejected", "RoundClosed",
                     "RunFinished"}


def test_finished_run_folders_are_served_overlaid(watched_run: dict[str, Any], tmp_path: Path) -> None:
    other = tmp_path / "copy"
    shutil.copytree(watched_run["folder"], other)
    state = from_run_folders([watched_run["folder"], other])
    snap = state.snapshot()
    assert [r["name"] for r in snap["runs"]] == [str(watched_run["folder"]), str(other)]
    live = watched_run["state"].snapshot()["runs"][0]["rounds"]
    for run in snap["runs"]:
        assert [r["round"] for r in run["rounds"]] == [r["round"] for r in live]
        assert [r["test_before_acc"] for r in run["rounds"]] == pytest.approx([r["test_before_acc"] for r in live],
                                                                             abs=1e-6)
    result = CliRunner().invoke(app, ["monitor", str(watched_run["folder"]), "--port", "0", "--seconds", "0.2"])
    assert result.exit_code == 0 and "dashboard: http://127.0.0.1:" in result.output, result.output
    bad = CliRunner().invoke(app, ["monitor", str(tmp_path / "nothing-here")])
    assert bad.exit_code == 2 and "no metrics.csv" in bad.output and "Traceback" not in bad.output


def test_a_failing_viewer_is_dropped_but_the_writer_is_never_silenced() -> None:
    bus = ev.EventBus()
    got: list[Any] = []

    def broken(event: Any) -> None:
        raise RuntimeError("viewer bug")

    bus.subscribe(broken)
    bus.subscribe(got.append)
    event = ev.UpdateRejected(0, 1, "duplicate")
    bus.emit(event)
    bus.emit(event)
    assert got == [event, event]  # the broken one was dropped after its first failure, the rest kept going
    writer_bus = ev.EventBus()
    writer_bus.subscribe(broken, critical=True)
    with pytest.raises(RuntimeError, match="viewer bug"):  # a writer that cannot record must stop the run
        writer_bus.emit(event)


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_off_loopback_needs_a_token_and_the_page_is_read_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a token"):
        MonitorConfig(enabled=True, host="0.0.0.0")
    result = CliRunner().invoke(app, ["simulate", "-d", "digits", "-cn", "2", "-ge", "1", "--visible", "1",
                                      "--visible-host", "0.0.0.0", "--out", str(tmp_path / "r")],
                                env={"FEDCMD_MONITOR_TOKEN": ""})
    assert result.exit_code == 2 and "needs a token" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()
    state = DashboardState("gated")
    m = serve_state(state, MonitorConfig(enabled=True, host="127.0.0.1", port=0, token=TOKEN), PrometheusSink())
    try:
        base = f"http://127.0.0.1:{m.port}"
        assert m.url == f"{base}/?token={TOKEN}"
        for path in ("/", "/api/state", "/events", "/metrics", "/static/dashboard.js"):
            assert _get(base + path)[0] == 401, path
        assert _get(base + "/api/state?token=wrong-token-wrong-token")[0] == 401
        code, headers, body = _get(m.url)
        assert code == 200 and b"fedcmd monitor" in body
        assert "default-src 'none'" in headers["content-security-policy"]
        cookie = headers["set-cookie"].split(";")[0]
        assert _get(base + "/static/dashboard.js", {"Cookie": cookie})[0] == 200  # the page's own assets
        code, _, body = _get(base + "/metrics", {"Authorization": f"Bearer {TOKEN}"})
        assert code == 200 and b"fedcmd_rounds_completed_total" in body
        for method in ("POST", "PUT", "DELETE"):  # no control actions anywhere
            for path in ("/", "/api/state", "/events", "/metrics"):
                assert _get(f"{base}{path}?token={TOKEN}", method=method)[0] == 405, (method, path)
    finally:
        m.stop()


def _next_event(resp: http.client.HTTPResponse) -> dict[str, Any]:
    while True:
        line = resp.readline()
        if not line:
            raise AssertionError("the event stream ended")
        if line.startswith(b"data: "):
            return json.loads(line[6:])


def test_the_event_stream_pushes_each_new_state() -> None:
    state = DashboardState("live")
    m = serve_state(state, MonitorConfig(enabled=True, port=0))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", m.port, timeout=10)
        conn.request("GET", "/events")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
        first = _next_event(resp)
        assert first["devices"] == [] and first["status"] == "waiting"
        state(ev.Presence(7, "online", "rpi4", None, time.time()))
        state(ev.RoundStarted(0, "select", (7,), 30.0, 1, time.time()))
        second = _next_event(resp)
        assert second["version"] > first["version"]
        assert second["devices"][0] | {"last_seen": None} == {
            "client": 7, "state": "online", "profile": "rpi4", "reason": None, "last_seen": None, "rounds": 0,
            "last_update_bytes": None, "rejects": 0}
        assert second["current"]["round"] == 1 and second["current"]["deadline"] == 30.0
        state(ev.Presence(7, "offline", None, None, time.time()))
        assert _next_event(resp)["devices"][0]["state"] == "offline"
        conn.close()
    finally:
        m.stop()


def test_a_taken_port_is_one_line_before_any_work(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = CliRunner().invoke(app, ["simulate", "-d", "digits", "-cn", "2", "-ge", "1", "--visible", "1",
                                          "--visible-port", str(port), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and f"port {port}" in result.output and "in use" in result.output
    assert not (tmp_path / "r").exists()


def test_the_chart_library_is_vendored_pinned_and_nothing_comes_from_elsewhere() -> None:
    for name, digest in VENDORED.items():
        assert hashlib.sha256((STATIC / "vendor" / name).read_bytes()).hexdigest() == digest, name
    assert "1.6.32" in (STATIC / "vendor" / "README.md").read_text()
    assert "MIT" in (STATIC / "vendor" / "uPlot.LICENSE").read_text()
    for own in ("index.html", "dashboard.js", "dashboard.css"):
        text = (STATIC / own).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, own
    html = (STATIC / "index.html").read_text()
    assert "<script>" not in html and "style=" not in html  # nothing inline: the CSP allows only own files


def _records(path: Path) -> list[bytes]:
    """TFRecord framing: length (u64), its crc (u32), data, data crc (u32)."""
    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        out.append(data[i + 12 : i + 12 + n])
        i += 12 + n + 4
    return out


def test_tensorboard_gets_every_rounds_scalars(watched_run: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("tensorboardX", reason="tensorboardX is not installed (pip install 'fedcmd[tensorboard]')")
    from tensorboardX.proto.event_pb2 import Event

    from cloud.monitor.tensorboard import TensorBoardSink

    sink = TensorBoardSink(tmp_path / "tb")
    for event in watched_run["events"]:
        sink(event)
    sink.close()
    scalars: dict[str, dict[int, float]] = {}
    for path in (tmp_path / "tb").glob("events.out.tfevents.*"):
        for raw in _records(path):
            e = Event.FromString(raw)
            for v in e.summary.value:
                scalars.setdefault(v.tag, {})[e.step] = v.simple_value
    records = watched_run["result"].records
    assert scalars["accuracy/test_before_acc"] == pytest.approx(
        {r.round + 1: r.metrics["test_before_acc"] for r in records}, abs=1e-4)
    assert scalars["bytes/up"] == {r.round + 1: float(r.bytes_up) for r in records}
    assert max(scalars["rejected/non_finite"].values()) == watched_run["result"].rejected["non_finite"]


def test_a_long_service_keeps_snapshots_bounded() -> None:
    from cloud.monitor.state import MAX_ROUNDS_SHOWN
    from cloud.service.coordinator import RoundRecord

    state = DashboardState("long")
    n = MAX_ROUNDS_SHOWN + 500
    for i in range(n):
        record = RoundRecord(i, "personal", [0], {"test_before_acc": float(i % 100)}, 1, 1, 0.1, {}, [0])
        state(ev.RoundClosed(record, {}, {}, time.time()))
    run = state.snapshot()["runs"][0]
    assert run["rounds_total"] == n and len(run["rounds"]) == MAX_ROUNDS_SHOWN
    assert run["rounds"][-1]["round"] == n and run["rounds"][0]["round"] == n - MAX_ROUNDS_SHOWN + 1
