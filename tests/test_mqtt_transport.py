# ruff: noqa: F811  (pytest fixtures imported from tests/brokers.py are parameters of the same name)
"""MqttTransport against real brokers: a mosquitto started by the test on a free loopback port (skipped
where mosquitto is not installed) and, once, the embedded amqtt broker. No mocks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from brokers import amqtt_broker, mosquitto_broker, mosquitto_factory  # noqa: F401  (fixtures; tests/conftest.py may import them too)

from protocols.broker import Broker, free_port
from protocols.chunking import parse_chunk, split
from protocols.codec import Header, decode, encode
from protocols.mqtt import MqttTransport, TlsConfig, TransportError, parse_url
from protocols.topics import (
    parse_presence,
    presence_filter,
    presence_payload,
    presence_topic,
    status_topic,
    task_topic,
    update_topic,
    updates_filter,
)

MOSQUITTO_PUB = shutil.which("mosquitto_pub")
requires_mosquitto_clients = pytest.mark.skipif(MOSQUITTO_PUB is None, reason="mosquitto_pub is not installed")

ROOT = Path(__file__).resolve().parents[1]
FLEET = "t"
WAIT = 30.0  # generous: two busy cores


@pytest.fixture
def transports() -> Iterator[list[MqttTransport]]:
    """Transports a test opens; closed at the end whatever happens."""
    opened: list[MqttTransport] = []
    yield opened
    for t in opened:
        t.close()


def _open(opened: list[MqttTransport], url: str, client_id: str, **kw: object) -> MqttTransport:
    t = MqttTransport(url, client_id, **kw)  # type: ignore[arg-type]
    opened.append(t)
    return t


class Inbox:
    """A handler that records (topic, payload) pairs."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []

    def __call__(self, topic: str, payload: bytes) -> None:
        self.items.append((topic, payload))

    @property
    def payloads(self) -> list[bytes]:
        return [p for _, p in self.items]


def test_exchange_both_ways(mosquitto_broker: Broker, transports: list[MqttTransport]) -> None:
    coord = _open(transports, mosquitto_broker.url, "coordinator")
    agent = _open(transports, mosquitto_broker.url, "agent-3")
    assert coord.protocol == "5" and coord.connected
    updates, tasks = Inbox(), Inbox()
    coord.subscribe(updates_filter(FLEET), updates)
    agent.subscribe(task_topic(FLEET, 3), tasks)
    weights = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
    coord.publish(task_topic(FLEET, 3), encode(Header(type="task", fleet=FLEET, round=0, client=3), weights))
    assert agent.run_until(lambda: len(tasks.items) == 1, WAIT)
    header, arrays = decode(tasks.payloads[0])
    assert header.round == 0 and np.array_equal(arrays["w"], weights["w"])
    reply = encode(Header(type="update", fleet=FLEET, round=0, client=3, num_samples=5), arrays, codec="fp16")
    agent.publish(update_topic(FLEET, 3), reply)
    assert coord.run_until(lambda: len(updates.items) == 1, WAIT)
    topic, payload = updates.items[0]
    assert topic == update_topic(FLEET, 3) and payload == reply
    assert coord.rejected == {} and agent.rejected == {}
    assert agent.bytes_published == len(reply)


def test_five_megabytes_cross_a_one_mebibyte_broker(mosquitto_broker: Broker, transports: list[MqttTransport]) -> None:
    assert "max_packet_size 1048576" in Path(mosquitto_broker.config_path).read_text()  # type: ignore[attr-defined]
    sender = _open(transports, mosquitto_broker.url, "sender", packet_limit=256 * 1024)
    receiver = _open(transports, mosquitto_broker.url, "receiver")
    inbox = Inbox()
    receiver.subscribe("big/#", inbox)
    payload = os.urandom(5_000_000)
    sender.publish("big/1", payload)
    assert receiver.run_until(lambda: len(inbox.items) == 1, WAIT)
    assert inbox.payloads[0] == payload
    assert sender.stats["chunks_out"] >= 20 and receiver.stats["chunks_in"] == sender.stats["chunks_out"]
    # A client asking for 4 MiB packets is held to the broker's advertised MQTT 5 Maximum Packet Size.
    greedy = _open(transports, mosquitto_broker.url, "greedy", packet_limit=4 * 1024 * 1024)
    greedy.publish("big/2", payload)
    assert receiver.run_until(lambda: len(inbox.items) == 2, WAIT)
    assert inbox.payloads[1] == payload and greedy.connected


@requires_mosquitto_clients
def test_the_broker_really_refuses_packets_over_its_limit(mosquitto_broker: Broker, tmp_path: Path) -> None:
    """The limit the chunking works around is real: one 1.5 MB PUBLISH costs an MQTT 3.1.1 client (which
    is not told the limit) its connection."""
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(1_500_000))
    proc = subprocess.run(
        [str(MOSQUITTO_PUB), "-p", str(mosquitto_broker.port), "-h", "127.0.0.1", "-V", "mqttv311", "-q", "1",
         "-t", "big/x", "-f", str(big)],
        capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert proc.returncode != 0
    assert mosquitto_broker.log_path is not None and "oversize packet" in mosquitto_broker.log_path.read_text()


def test_burst_of_2000_qos1_messages_all_arrive(mosquitto_broker: Broker, transports: list[MqttTransport]) -> None:
    sender = _open(transports, mosquitto_broker.url, "burst-sender")
    receiver = _open(transports, mosquitto_broker.url, "burst-receiver")
    inbox = Inbox()
    receiver.subscribe(updates_filter(FLEET), inbox)
    n = 2000
    for i in range(n):  # the receiver does not consume meanwhile: the broker must queue them all
        sender.publish(update_topic(FLEET, i % 50), i.to_bytes(4, "big"))
    assert receiver.run_until(lambda: len(inbox.items) >= n, WAIT), f"{len(inbox.items)} of {n} arrived"
    got = sorted(int.from_bytes(p, "big") for p in inbox.payloads)
    assert got == list(range(n))  # every one, once


MOSQUITTO_DEFAULT_QUEUES = "max_queued_messages 1000\nmax_inflight_messages 20"


@pytest.mark.parametrize(("extra", "lossy"), [("", False), (MOSQUITTO_DEFAULT_QUEUES, True)])
def test_a_stalled_subscriber_gets_the_whole_burst(
    mosquitto_factory: Callable[..., Broker], transports: list[MqttTransport], extra: str, lossy: bool
) -> None:
    """DESIGN.md §6: with mosquitto's defaults (1000 queued, 20 in flight) a subscriber that stops reading for
    a moment silently loses QoS 1 messages; our generated config (max_queued_messages 0) loses none."""
    broker = mosquitto_factory(extra)
    # A plain paho client as the subscriber, so the test can stop it reading its socket.
    got: list[bytes] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="stalled", protocol=mqtt.MQTTv311)
    sub.on_message = lambda c, u, m: got.append(m.payload)
    subscribed: list[int] = []
    sub.on_subscribe = lambda c, u, mid, rc, p: subscribed.append(mid)
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe("burst/#", qos=1)
    deadline = time.monotonic() + WAIT
    while not subscribed and time.monotonic() < deadline:
        sub.loop(0.05)
    sender = _open(transports, broker.url, "burst-sender")
    n = 2000
    for i in range(n):  # meanwhile the subscriber reads nothing
        sender.publish("burst/1", i.to_bytes(4, "big"))
    deadline = time.monotonic() + WAIT
    last_growth, seen = time.monotonic(), 0
    while len(got) < n and time.monotonic() < deadline:
        sub.loop(0.05)
        if len(got) > seen:
            last_growth, seen = time.monotonic(), len(got)
        elif lossy and time.monotonic() - last_growth > 0.5:
            break  # the broker has delivered all it kept
    sub.disconnect()
    values = {int.from_bytes(parse_chunk(p)[1], "big") for p in got}
    if lossy:
        assert len(values) < n  # the pitfall is real ...
    else:
        assert values == set(range(n))  # ... and the generated config avoids it


def test_retained_status_reaches_a_late_subscriber(mosquitto_broker: Broker, transports: list[MqttTransport]) -> None:
    coord = _open(transports, mosquitto_broker.url, "coordinator")
    coord.publish(status_topic(FLEET), json.dumps({"round": 4}).encode(), retain=True)
    late = _open(transports, mosquitto_broker.url, "late-agent")
    first, second = Inbox(), Inbox()
    late.subscribe(status_topic(FLEET), first)
    assert late.run_until(lambda: bool(first.items), WAIT)
    assert json.loads(first.payloads[0]) == {"round": 4}
    # a second handler on the same transport gets the retained message too (as with MemoryTransport)
    late.subscribe(status_topic(FLEET), second)
    assert late.run_until(lambda: bool(second.items), WAIT)
    # a retained message must fit one packet (the broker keeps only the last message per topic)
    with pytest.raises(ValueError, match="does not fit one packet"):
        coord.publish(status_topic(FLEET), os.urandom(600_000), retain=True)


_AGENT = """
import sys, time
from protocols.mqtt import MqttTransport
from protocols.topics import presence_payload, presence_topic
t = MqttTransport(sys.argv[1], "agent-7", will=(presence_topic("t", 7), presence_payload(7, "offline"), True))
t.publish(presence_topic("t", 7), presence_payload(7, "online"), retain=True)
print("ready", flush=True)
time.sleep(300)
"""


def test_last_will_fires_when_an_agent_is_killed(mosquitto_broker: Broker, transports: list[MqttTransport]) -> None:
    watcher = _open(transports, mosquitto_broker.url, "watcher")
    states: list[tuple[int, str]] = []

    def on_presence(topic: str, payload: bytes) -> None:
        doc = parse_presence(payload)
        states.append((doc["client"], doc["state"]))

    watcher.subscribe(presence_filter(FLEET), on_presence)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _AGENT, mosquitto_broker.url], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        assert watcher.run_until(lambda: (7, "online") in states, WAIT)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(WAIT)
        assert watcher.run_until(lambda: states[-1] == (7, "offline"), WAIT), states
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the will was retained: a coordinator that starts now learns the device is offline
    late = _open(transports, mosquitto_broker.url, "late-watcher")
    seen = Inbox()
    late.subscribe(presence_topic(FLEET, 7), seen)
    assert late.run_until(lambda: bool(seen.items), WAIT)
    assert parse_presence(seen.payloads[0])["state"] == "offline"


def test_clean_close_does_not_fire_the_will(mosquitto_broker: Broker, transports: list[MqttTransport]) -> None:
    watcher = _open(transports, mosquitto_broker.url, "watcher")
    seen = Inbox()
    watcher.subscribe(presence_filter(FLEET), seen)
    agent = MqttTransport(
        mosquitto_broker.url, "agent-8", will=(presence_topic(FLEET, 8), presence_payload(8, "offline"), True)
    )
    agent.publish(presence_topic(FLEET, 8), presence_payload(8, "online"), retain=True)
    agent.close()
    marker = _open(transports, mosquitto_broker.url, "marker")
    marker.publish(presence_topic(FLEET, 9), presence_payload(9, "online"))  # ordered after any will
    assert watcher.run_until(lambda: len(seen.items) >= 2, WAIT)
    assert [parse_presence(p)["state"] for p in seen.payloads] == ["online", "online"]
    with pytest.raises(TransportError, match="closed"):
        agent.publish("x", b"late")


def test_broker_restart_reconnects_and_resubscribes(mosquitto_broker: Broker, transports: list[MqttTransport]) -> None:
    receiver = _open(transports, mosquitto_broker.url, "receiver")
    online = presence_payload(5, "online")
    sender = _open(transports, mosquitto_broker.url, "agent-5")
    sender.set_birth((presence_topic(FLEET, 5), online, True))  # as an agent does once it listens for tasks
    inbox = Inbox()
    receiver.subscribe("restart/#", inbox)
    sender.publish("restart/1", b"before")
    assert receiver.run_until(lambda: len(inbox.items) == 1, WAIT)
    mosquitto_broker.restart()  # persistence false: sessions, subscriptions and retained messages are gone
    deadline = time.monotonic() + WAIT
    while not (receiver.stats["connects"] >= 2 and sender.stats["connects"] >= 2) and time.monotonic() < deadline:
        receiver.wait_connected(0.1)
        time.sleep(0.05)  # polling the reconnect counters, not waiting a fixed time
    assert receiver.stats["connects"] >= 2 and sender.stats["connects"] >= 2
    assert receiver.wait_connected(WAIT) and sender.wait_connected(WAIT)
    # the receiver re-subscribed in on_connect; waiting for a SUBACK round trip of a fresh subscription on
    # the same connection proves the earlier re-SUBSCRIBE was processed
    receiver.subscribe("unrelated/topic", Inbox())
    sender.publish("restart/2", b"after")
    assert receiver.run_until(lambda: len(inbox.items) == 2, WAIT), inbox.items
    assert inbox.payloads == [b"before", b"after"]
    # the birth message restored the retained presence the restart wiped
    late = _open(transports, mosquitto_broker.url, "late")
    seen = Inbox()
    late.subscribe(presence_topic(FLEET, 5), seen)
    assert late.run_until(lambda: bool(seen.items), WAIT) and seen.payloads[0] == online


def test_publish_fails_clearly_when_the_broker_is_gone(
    mosquitto_broker: Broker, transports: list[MqttTransport]
) -> None:
    t = _open(transports, mosquitto_broker.url, "lonely", publish_timeout=1.0, max_outage=1.0)
    mosquitto_broker.stop()
    with pytest.raises(TransportError, match="no acknowledgement"):
        t.publish("x/y", b"hello")
    started = time.monotonic()
    with pytest.raises(TransportError, match="cannot connect"):
        MqttTransport(f"mqtt://127.0.0.1:{free_port()}", "nobody", connect_timeout=1.0)
    assert time.monotonic() - started < 10


@requires_mosquitto_clients
def test_junk_from_mosquitto_pub_is_rejected_and_counted(
    mosquitto_broker: Broker, transports: list[MqttTransport], tmp_path: Path
) -> None:
    coord = _open(transports, mosquitto_broker.url, "coordinator", reassembly_timeout=0.5)
    inbox = Inbox()
    coord.subscribe(updates_filter(FLEET), inbox)
    first_of_two = split(os.urandom(3000), 2000)[0]  # a stream that will never complete
    junk = {
        "garbage": b"garbage",
        "empty-envelope": b"FCH1\x00\x02{}",
        "bad-sha": split(b"x" * 100, 1000)[0][:-1] + b"y",
        "partial": first_of_two,
    }
    for name, data in junk.items():
        (tmp_path / name).write_bytes(data)
        subprocess.run(
            [str(MOSQUITTO_PUB), "-h", "127.0.0.1", "-p", str(mosquitto_broker.port), "-q", "1",
             "-t", update_topic(FLEET, 4), "-f", str(tmp_path / name)],
            check=True, timeout=WAIT,
        )  # fmt: skip
    good = encode(Header(type="update", fleet=FLEET, round=0, client=4), {"w": np.ones(3, dtype=np.float32)})
    _open(transports, mosquitto_broker.url, "agent-4").publish(update_topic(FLEET, 4), good)
    assert coord.run_until(lambda: bool(inbox.items) and coord.rejected["expired"] >= 1, WAIT), coord.rejected
    assert inbox.payloads == [good]  # only the good message reached the handler
    assert coord.rejected["envelope"] == 2 and coord.rejected["integrity"] == 1 and coord.rejected["expired"] == 1


def test_handler_errors_and_oversize_messages_do_not_stop_the_loop(
    mosquitto_broker: Broker, transports: list[MqttTransport]
) -> None:
    receiver = _open(transports, mosquitto_broker.url, "receiver", max_message_bytes=10_000)
    sender = _open(transports, mosquitto_broker.url, "sender")
    inbox = Inbox()

    def fragile(topic: str, payload: bytes) -> None:
        if payload == b"boom":
            raise RuntimeError("handler bug")
        inbox(topic, payload)

    receiver.subscribe("h/#", fragile)
    for payload in (b"boom", os.urandom(20_000), b"fine"):
        sender.publish("h/1", payload)
    assert receiver.run_until(lambda: bool(inbox.items), WAIT)
    assert inbox.payloads == [b"fine"]
    assert receiver.rejected["handler_error"] == 1 and receiver.rejected["oversize"] >= 1


def test_amqtt_exchange(amqtt_broker: Broker, transports: list[MqttTransport]) -> None:
    """The embedded broker (used when mosquitto is absent): MQTT 3.1.1, chunked messages, retained."""
    a = _open(transports, amqtt_broker.url, "a")
    b = _open(transports, amqtt_broker.url, "b")
    assert a.protocol == "3.1.1"
    inbox = Inbox()
    b.subscribe("x/+", inbox)
    payload = os.urandom(600_000)  # three chunks
    a.publish("x/1", payload)
    a.publish("x/2", b"small", retain=True)
    assert b.run_until(lambda: len(inbox.items) == 2, WAIT)
    assert inbox.payloads == [payload, b"small"]
    back = Inbox()
    a.subscribe("y", back)
    b.publish("y", b"pong")
    assert a.run_until(lambda: bool(back.items), WAIT) and back.payloads == [b"pong"]


def test_urls() -> None:
    assert parse_url("mqtt://127.0.0.1:1884").port == 1884
    addr = parse_url("mqtts://dev%40x:p%3Aw@broker.example?protocol=3.1.1")
    assert (addr.host, addr.port, addr.tls, addr.username, addr.password, addr.protocol) == (
        "broker.example", 8883, True, "dev@x", "p:w", "3.1.1"
    )
    for bad in ["tcp://h:1", "mqtt://", "mqtt://h:1/path", "mqtt://h:1?x=1", "mqtt://h:1?protocol=4", "mqtt://h:99999"]:
        with pytest.raises(ValueError):
            parse_url(bad)


def _openssl_certs(tmp: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a broker certificate for 127.0.0.1 (EC keys: fast)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([str(openssl), *args], check=True, capture_output=True, timeout=WAIT, cwd=tmp)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=fedcmd test CA")
    run("req", *ec, "-keyout", "broker.key", "-out", "broker.csr", "-subj", "/CN=127.0.0.1")
    (tmp / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "broker.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "broker.crt", "-days", "2", "-extfile", "san.ext")  # fmt: skip
    return tmp / "ca.crt", tmp / "broker.crt", tmp / "broker.key"


def test_tls_with_the_right_ca_only(mosquitto_factory: Callable[..., Broker], tmp_path: Path) -> None:
    ca, cert, key = _openssl_certs(tmp_path)
    port = free_port()
    mosquitto_factory(f"listener {port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n")
    url = f"mqtts://127.0.0.1:{port}"
    with MqttTransport(url, "tls-client", tls=TlsConfig(str(ca))) as t:
        inbox = Inbox()
        t.subscribe("secure/x", inbox)
        t.publish("secure/x", b"over tls")
        assert t.run_until(lambda: bool(inbox.items), WAIT) and inbox.payloads == [b"over tls"]
    with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
        MqttTransport(url, "no-ca", connect_timeout=1.0)  # system CAs do not trust our test CA


def test_every_reconnect_births_a_message_a_listener_accepts(
    mosquitto_broker: Broker, transports: list[MqttTransport]
) -> None:
    """A listener connected across broker restarts hears the birth after each one: every send is a fresh
    envelope, not a repeat of a message id it has already seen (which it would drop as a redelivery)."""
    agent = _open(transports, mosquitto_broker.url, "agent-6")
    agent.set_birth((presence_topic(FLEET, 6), presence_payload(6, "online"), True))
    watcher = _open(transports, mosquitto_broker.url, "watcher")
    seen = Inbox()
    watcher.subscribe(presence_topic(FLEET, 6), seen)
    for restart in (1, 2):
        mosquitto_broker.restart()
        deadline = time.monotonic() + WAIT
        while not (agent.stats["connects"] > restart and watcher.stats["connects"] > restart) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        watcher.subscribe("unrelated/topic", Inbox())  # a SUBACK round trip: the re-subscription is in place
        assert watcher.run_until(lambda n=restart: len(seen.items) >= n, WAIT), (restart, seen.items)
    assert [parse_presence(p)["state"] for p in seen.payloads] == ["online", "online"]
