"""The dashboard in a real browser (headless Debian chromium through chromedriver), with every non-loopback
address blocked: a live `fedcmd simulate --visible 1` run shows its rounds while they happen and ends
showing exactly metrics.csv; a fleet's device table follows the coordinator's presence (an agent killed with
SIGKILL turns offline on the page). Screenshots are saved (FEDCMD_SCREENSHOTS=DIR keeps a copy)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium / chromedriver are not installed (apt-get install -y chromium chromium-driver)",
)
# Everything but loopback is unreachable: names do not resolve, and any other address goes to a dead proxy.
BLOCK_NETWORK = ["--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1900", "--no-first-run", "--disable-extensions", *BLOCK_NETWORK]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _until(what: str, predicate: Callable[[], Any], timeout: float) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _screenshot(driver: Any, path: Path) -> None:
    driver.save_screenshot(str(path))
    keep = os.environ.get("FEDCMD_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)


def _page_rounds(driver: Any) -> list[dict[str, Any]]:
    """The rounds table as the page shows it: round number and the exact values behind the shown cells."""
    return driver.execute_script("""
        return Array.from(document.querySelectorAll('#rounds tbody tr')).map(tr => {
          const row = {round: Number(tr.dataset.round), shown: {}};
          for (const td of tr.querySelectorAll('td[data-key]')) {
            row[td.dataset.key] = td.dataset.value === '' ? null : Number(td.dataset.value);
            row.shown[td.dataset.key] = td.textContent;
          }
          return row;
        });""")


def _open(driver: Any, url: str) -> None:
    """Leave the previous page (its server is gone: its retries are not this page's errors), then load ``url``."""
    driver.get("about:blank")
    driver.get_log("browser")
    driver.get(url)


def _only_loopback_and_no_errors(driver: Any, origin: str) -> None:
    names = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert names and all(n.startswith(origin) for n in names), names
    assert driver.execute_script("return typeof uPlot") == "function"  # the vendored chart library loaded
    assert driver.execute_script("return document.querySelectorAll('.uplot').length") == 4  # four charts drawn
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe


def _read_url(proc: subprocess.Popen, log: list[str], timeout: float) -> str:
    """The URL the command prints; its output keeps being collected into ``log`` (a reader thread)."""
    assert proc.stdout is not None
    stream = proc.stdout

    def pump() -> None:
        for line in stream:
            log.append(line)

    threading.Thread(target=pump, daemon=True).start()
    found = _until("the dashboard URL", lambda: next((m.group(1) for line in list(log) if (
        m := re.search(r"dashboard: (http://127\.0\.0\.1:\d+/)", line))), None) or proc.poll() is not None, timeout)
    assert isinstance(found, str), "".join(log)[-3000:]
    return found


@pytest.mark.timeout(300)
def test_a_live_simulation_on_the_page_equals_its_metrics_csv(browser: Any, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(
        [str(BIN / "fedcmd"), "simulate", "--algo", "fedcmd", "-d", "digits", "-cn", "6", "-jr", "0.5", "-ge", "16",
         "-le", "1", "-tg", "0", "--seed", "2", "--hp", "selection_rounds=3", "--visible", "1", "--visible-port", "0",
         "--visible-keep", "60", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        # Ctrl-C must reach it even where this test runs in the background (which ignores SIGINT)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log: list[str] = []
    try:
        url = _read_url(proc, log, 120)
        _open(browser, url)
        # live: the page moves on its own (no reload) while the run goes
        seen: set[int] = set()

        def progressed() -> bool:
            status = browser.execute_script("return document.body.dataset.status")
            if status == "running":
                seen.add(len(_page_rounds(browser)))
            return status == "finished"

        _until("the run to finish on the page", progressed, 180)
        assert len(seen) >= 2, f"the page showed only {seen} rounds while running: not live"
        _until("the run folder", lambda: (out / "metrics.csv").is_file(), 60)
        with (out / "metrics.csv").open() as f:
            written = list(csv.DictReader(f))
        shown = sorted(_page_rounds(browser), key=lambda r: r["round"])
        assert [r["round"] for r in shown] == [int(r["round"]) for r in written] == list(range(1, 17))
        for page, row in zip(shown, written):
            for key in ("test_before_acc", "test_after_acc", "bytes_down", "bytes_up"):
                assert page[key] == pytest.approx(float(row[key]), abs=1e-6), (page["round"], key)
            assert page["shown"]["test_before_acc"] == f"{float(row['test_before_acc']):.2f}"
        summary = json.loads((out / "summary.json").read_text())
        assert browser.find_element("id", "paper-metric").text == f"{summary['paper_metric']:.2f} %"
        assert browser.find_element("id", "chosen-layer").text == summary["strategy"]["chosen_layer"]
        _only_loopback_and_no_errors(browser, url.rstrip("/"))
        _screenshot(browser, tmp_path / "dashboard-simulation.png")
    finally:
        proc.send_signal(signal.SIGINT)  # ends --visible-keep early
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, log


def _serve_config(tmp: Path, url: str, port: int) -> Path:
    text = f"""fleet = "watched"
broker = "{url}"
checkpoint = "{tmp / 'ckpt.safetensors'}"
out = "{tmp / 'out'}"
join_ratio = 0.06
min_clients = 1
round_deadline = 20.0
wait_clients = 3
registration_timeout = 180.0
[monitor]
enabled = true
port = {port}
[run]
algo = "fedcmd"
input_shape = [1, 28, 28]
num_classes = 10
num_clients = 50
global_epoch = 100000
local_epoch = 1
seed = 4
[run.hp]
selection_rounds = 2
"""
    path = tmp / "cloud.toml"
    path.write_text(text)
    return path


def _status(url: str) -> dict[str, Any]:
    from protocols.mqtt import MqttTransport
    from protocols.topics import status_topic

    t = MqttTransport(url, f"probe-{time.monotonic_ns()}")
    got: dict[str, Any] = {}
    t.subscribe(status_topic("watched"), lambda topic, p: got.update(json.loads(p)))
    t.run_until(lambda: bool(got), 5)
    t.close()
    return got


def _device_states(driver: Any) -> dict[int, str]:
    return {int(k): v for k, v in driver.execute_script(
        "return Object.fromEntries(Array.from(document.querySelectorAll('#devices tbody tr'))"
        ".map(tr => [tr.dataset.client, tr.dataset.state]))").items()}


@pytest.mark.timeout(400)
def test_the_fleet_device_table_follows_presence_and_a_killed_agent_goes_offline(
    browser: Any, tmp_path: Path, shared_partition: Path, mosquitto_broker: Any
) -> None:
    from protocols.broker import free_port

    url = mosquitto_broker.url
    port = free_port()
    serve_log = (tmp_path / "serve.log").open("ab")
    config = _serve_config(tmp_path, url, port)
    serve = subprocess.Popen([str(BIN / "fedcmd"), "cloud", "serve", "--config", str(config)],
                             stdout=serve_log, stderr=subprocess.STDOUT)
    agents = []
    for cid in range(3):
        log = (tmp_path / f"agent-{cid}.log").open("ab")
        agents.append(subprocess.Popen(
            [str(BIN / "fedcmd-edge"), "run", "--broker", url, "--client-id", str(cid), "--data", str(shared_partition),
             "-d", "mnist5k", "--state-dir", str(tmp_path / f"state-{cid}"), "--fleet", "watched", "--wait", "120",
             "--no-onnx", "--profile", "rpi4"],
            stdout=log, stderr=subprocess.STDOUT))
    page = f"http://127.0.0.1:{port}/"
    try:
        _until("the dashboard", lambda: _reachable(page), 120)
        _open(browser, page)
        _until("three devices online on the page", lambda: _device_states(browser) == {0: "online", 1: "online",
                                                                                       2: "online"}, 180)
        _until("a closed round", lambda: _status(url).get("next_round", 0) >= 1, 120)
        profiles = browser.execute_script(
            "return Array.from(document.querySelectorAll('#devices tbody tr')).map(tr => tr.cells[2].textContent)")
        assert profiles == ["rpi4"] * 3
        assert _status(url)["online"] == 3
        os.kill(agents[2].pid, signal.SIGKILL)  # its connection drops: the broker sends its last will
        agents[2].wait(10)
        _until("device 2 offline on the page", lambda: _device_states(browser).get(2) == "offline", 60)
        assert _device_states(browser) == {0: "online", 1: "online", 2: "offline"}
        # the coordinator's own view agrees (its retained status after the next round)
        _until("the coordinator's status to say 2 online", lambda: _status(url).get("online") == 2, 90)
        counts = browser.find_element("id", "device-counts").text
        assert "2 online" in counts and "1 offline" in counts
        _only_loopback_and_no_errors(browser, page.rstrip("/"))
        _screenshot(browser, tmp_path / "dashboard-fleet.png")
    finally:
        for p in [serve, *agents]:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def _reachable(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url + "healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
