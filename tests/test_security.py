"""Broker security: `fedcmd deploy certs|users|acl`, proved against a real mosquitto.

One broker per module (started by the test on free loopback ports) serves every broker test: a password
listener and a TLS listener that takes the client certificate's CN as username. "X cannot see Y" checks
never sleep: after the forbidden message the same sender sends an allowed marker, and mosquitto keeps
the order of one connection's messages, so once the marker arrived the forbidden one is not coming.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import queue
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cloud.cli.deploy import deploy_app
from cloud.deploy import security
from protocols import topics

FLEET = "t"
WAIT = 15.0  # generous: two busy cores


def _which(name: str) -> str | None:
    # /usr/sbin is not on every user's PATH, and that is where Debian puts the broker.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


MOSQUITTO = _which("mosquitto")
MOSQUITTO_PASSWD = _which("mosquitto_passwd")
needs_mosquitto = pytest.mark.skipif(
    MOSQUITTO is None, reason="mosquitto is not installed (apt-get install -y mosquitto mosquitto-clients)"
)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(deploy_app, list(args))


def assert_user_error(result: Any, *, contains: str) -> None:
    """Exit 2, one red 'error:' line on stderr, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert contains in lines[0], lines[0]
    assert "Traceback" not in result.output and not isinstance(result.exception, (ValueError, OSError))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------------------- naming


def test_device_lists() -> None:
    assert security.parse_device_ids("0,1,2", None) == [0, 1, 2]
    assert security.parse_device_ids(" 3-5, 9 ,007", None) == [3, 4, 5, 9, 7]
    assert security.parse_device_ids(None, 3) == [0, 1, 2]
    for bad in ("", "a", "1,,2", "-1", "1,1", "5-3", "1.5", "0-200000"):
        with pytest.raises(security.SecurityError):
            security.parse_device_ids(bad, None)
    for devices, count in ((None, None), ("1", 2), (None, 0)):
        with pytest.raises(security.SecurityError):
            security.parse_device_ids(devices, count)


def test_acl_follows_the_topic_scheme() -> None:
    """The ACL's %u patterns are exactly protocols.topics with the username (= the decimal id) in place."""
    text = security.acl_text(FLEET)
    lines = {line for line in text.splitlines() if line and not line.startswith("#")}
    own = {
        "write": [topics.update_topic(FLEET, 7), topics.presence_topic(FLEET, 7)],
        "read": [topics.task_topic(FLEET, 7)],
    }
    for access, names in own.items():
        for name in names:
            assert f"pattern {access} {name.replace('/7/', '/%u/')}" in lines
    assert security.device_username(7) == "7"
    assert f"pattern read {topics.status_topic(FLEET)}" in lines
    assert f"topic read {topics.updates_filter(FLEET)}" in lines
    assert f"topic read {topics.presence_filter(FLEET)}" in lines
    assert not any("%c" in line for line in lines)  # client ids are not authenticated
    assert "fedcmd/+/client/%u/update" in security.acl_text("+")
    with pytest.raises(security.SecurityError):
        security.acl_text("a/b")


# ---------------------------------------------------------------------------------------------- passwords


def test_password_hash_roundtrip_and_format() -> None:
    encoded = security.hash_password("s3cret", iterations=1000)
    kind, iterations, salt, digest = encoded.split("$")[1:]
    assert (kind, iterations, len(salt), len(digest)) == ("7", "1000", 16, 88)  # 12-byte salt, 64-byte hash
    assert security.verify_password("s3cret", encoded)
    assert not security.verify_password("s3cret!", encoded)
    assert not security.verify_password("s3cret", "$7$1000$!!$!!") and not security.verify_password("x", "plain")
    assert len({security.generate_password() for _ in range(50)}) == 50


@pytest.mark.skipif(MOSQUITTO_PASSWD is None, reason="mosquitto_passwd is not installed (apt-get install mosquitto)")
def test_verifier_accepts_mosquitto_passwd_output(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    for user, password in (("alice", "correct horse"), ("0", "p:w$d")):
        flags = ["-c"] if not path.exists() else []
        subprocess.run([MOSQUITTO_PASSWD, *flags, "-b", str(path), user, password], check=True, timeout=30)
    users = security.parse_password_file(path.read_text())
    assert security.verify_password("correct horse", users["alice"])
    assert security.verify_password("p:w$d", users["0"])
    assert not security.verify_password("correct horse", users["0"])


def test_users_cli_writes_password_file_and_credentials(tmp_path: Path) -> None:
    out = tmp_path / "broker" / "passwd"
    result = invoke("users", "--out", str(out), "--devices", "0-2", "--password-dir", str(tmp_path / "cred"))
    assert result.exit_code == 0, result.output
    users = security.parse_password_file(out.read_text())
    assert list(users) == ["coordinator", "observer", "0", "1", "2"]
    assert mode(out) == 0o600
    for user, encoded in users.items():
        cred = tmp_path / "cred" / f"{user}.password"
        assert mode(cred) == 0o600
        assert security.verify_password(cred.read_text().strip(), encoded)

    # --add: a new device joins, nobody else's password changes.
    before = dict(users)
    result = invoke("users", "--out", str(out), "--devices", "3", "--password-dir", str(tmp_path / "cred"), "--add")
    assert result.exit_code == 0, result.output
    after = security.parse_password_file(out.read_text())
    assert list(after) == ["coordinator", "observer", "0", "1", "2", "3"]
    assert all(after[u] == before[u] for u in before)
    assert security.verify_password((tmp_path / "cred" / "3.password").read_text().strip(), after["3"])

    # Mistakes: one line, exit 2, nothing changed.
    files = snapshot(tmp_path)
    assert_user_error(invoke("users", "--out", str(out), "--count", "2"), contains="--force")
    assert_user_error(invoke("users", "--out", str(out), "--devices", "2", "--add",
                             "--password-dir", str(tmp_path / "cred")), contains="device 2 is already in")
    assert_user_error(invoke("users", "--out", str(out), "--devices", "0,x"), contains="bad device list")
    (tmp_path / "junk").write_text("coordinator $7$\n")
    files = snapshot(tmp_path)
    assert_user_error(invoke("users", "--out", str(tmp_path / "junk"), "--devices", "9", "--add"),
                      contains="line 1 of")
    assert snapshot(tmp_path) == files


# ------------------------------------------------------------------------------------------------ certs


def _load_cert(path: Path) -> Any:
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certs_chain_san_modes_and_refusals(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.x509.verification import PolicyBuilder, Store

    out = tmp_path / "pki"
    result = invoke("certs", "--out", str(out), "--devices", "0,1", "--fleet", FLEET,
                    "--broker-host", "broker.local,localhost", "--broker-ip", "127.0.0.1")
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert names == {f"{s}.{e}" for s in ("ca", "broker", "coordinator", "0", "1") for e in ("crt", "key")}
    for p in out.iterdir():
        assert mode(p) == (0o600 if p.suffix == ".key" else 0o644), p
    assert mode(out) == 0o700  # the folder holds the CA key

    ca = _load_cert(out / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    now = dt.datetime.now(dt.timezone.utc)
    store = Store([ca])
    broker = _load_cert(out / "broker.crt")
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.local", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    # RFC 5280 path validation (cryptography's verifier is strict: key usages, AKI/SKI, SAN, validity).
    for subject in (x509.DNSName("broker.local"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        chain = PolicyBuilder().store(store).time(now).build_server_verifier(subject).verify(broker, [])
        assert chain[-1] == ca
    client_verifier = PolicyBuilder().store(store).time(now).build_client_verifier()
    for user in ("coordinator", "0", "1"):
        cert = _load_cert(out / f"{user}.crt")
        assert client_verifier.verify(cert, []).chain[-1] == ca
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == user
        assert (cert.not_valid_after_utc - now).days in (824, 825)
        urn = x509.UniformResourceIdentifier(f"urn:fedcmd:{FLEET}:user:{user}")
        assert client_verifier.verify(cert, []).subjects == [urn]

    # Refuse to overwrite; nothing changes, no temporary file is left behind.
    files = snapshot(out)
    assert_user_error(invoke("certs", "--out", str(out), "--devices", "0"), contains="--force")
    assert snapshot(out) == files
    # --force re-issues leaves with the same CA: the CA key is never replaced.
    result = invoke("certs", "--out", str(out), "--devices", "1", "--force")
    assert result.exit_code == 0 and "reused the existing CA" in result.stdout, result.output
    assert (out / "ca.key").read_bytes() == files["ca.key"] and (out / "1.key").read_bytes() != files["1.key"]
    # Adding a device later: only its files, signed by the same CA.
    result = invoke("certs", "--out", str(out), "--devices", "2", "--devices-only")
    assert result.exit_code == 0, result.output
    assert client_verifier.verify(_load_cert(out / "2.crt"), []).chain[-1] == ca
    assert (out / "broker.key").read_bytes() != files["broker.key"]  # from the --force run, not this one
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_certs_mistakes_leave_nothing(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cases = [
        (["--out", str(tmp_path / "a"), "--devices", "1,x"], "bad device list"),
        (["--out", str(tmp_path / "a"), "--devices", "1", "--count", "2"], "exactly one of"),
        (["--out", str(tmp_path / "a"), "--count", "1", "--broker-ip", "300.1.1.1"], "bad broker IP"),
        (["--out", str(tmp_path / "a"), "--count", "1", "--broker-host", "10.0.0.1"], "bad broker host"),
        (["--out", str(tmp_path / "a"), "--count", "1", "--fleet", "a+b"], "bad fleet name"),
        (["--out", str(tmp_path / "a"), "--count", "1", "--key-type", "dsa"], "unknown key type"),
        (["--out", str(tmp_path / "a"), "--count", "1", "--days", "0"], "--days"),
        (["--out", str(tmp_path / "a"), "--count", "1", "--devices-only"], "needs the existing CA"),
        (["--out", str(blocker / "pki"), "--count", "1"], "cannot write"),  # unwritable: parent is a file
        (["--out", str(blocker), "--count", "1"], "not a directory"),
    ]
    for args, message in cases:
        assert_user_error(invoke("certs", *args), contains=message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert_user_error(invoke("acl", "--out", str(blocker / "acl")), contains="cannot write")
    assert_user_error(invoke("users", "--out", str(blocker / "pw"), "--count", "1"), contains="cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]

    # A CA certificate without its key (or the reverse) is never silently replaced.
    half = tmp_path / "half"
    half.mkdir()
    (half / "ca.crt").write_text("x")
    assert_user_error(invoke("certs", "--out", str(half), "--count", "1", "--force"), contains="ca.key does not")
    assert [p.name for p in half.iterdir()] == ["ca.crt"]


def test_acl_cli(tmp_path: Path) -> None:
    out = tmp_path / "acl"
    assert invoke("acl", "--out", str(out), "--fleet", FLEET).exit_code == 0
    assert out.read_text() == security.acl_text(FLEET) and mode(out) == 0o644
    assert_user_error(invoke("acl", "--out", str(out)), contains="--force")
    assert invoke("acl", "--out", str(out), "--force").exit_code == 0
    assert "fedcmd/+/client/%u/task" in out.read_text()
    assert_user_error(invoke("acl", "--out", str(tmp_path / "b"), "--fleet", "x#"), contains="bad fleet name")


# --------------------------------------------------------------------------------------- a real broker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    port: int
    tls_port: int
    dir: Path
    passwords: dict[str, str]

    @property
    def certs(self) -> Path:
        return self.dir / "pki"


def _start_mosquitto(conf_for: Any, folder: Path) -> tuple[subprocess.Popen[bytes], int, int, Path]:
    """Start mosquitto on free ports (retrying if another process takes a port in between)."""
    assert MOSQUITTO is not None
    log = folder / "mosquitto.log"
    for _ in range(3):
        port, tls_port = _free_port(), _free_port()
        conf = folder / "mosquitto.conf"
        conf.write_text(conf_for(port, tls_port))
        with log.open("wb") as sink:
            proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                for p in (port, tls_port):
                    socket.create_connection(("127.0.0.1", p), timeout=1).close()
                return proc, port, tls_port, log
            except OSError:
                time.sleep(0.05)
        proc.kill()
        proc.wait()
        if "Address already in use" not in log.read_text(errors="replace"):
            break
    pytest.fail(f"mosquitto did not start:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto mosquitto-clients)")
    pytest.importorskip("paho.mqtt")
    pytest.importorskip("cryptography")
    folder = tmp_path_factory.mktemp("broker")
    security.write_certs(folder / "pki", [0, 1], fleet=FLEET)
    security.write_users(folder / "passwd", [0, 1], password_dir=folder / "cred")
    security.write_acl(folder / "acl", FLEET)
    passwords = {p.stem: p.read_text().strip() for p in (folder / "cred").iterdir()}

    def conf(port: int, tls_port: int) -> str:
        pki = folder / "pki"
        # As root, mosquitto would drop to user `mosquitto`, who cannot read pytest's 0700 folders.
        return security.broker_config(
            password_file=folder / "passwd", acl_file=folder / "acl", port=port, tls_port=tls_port,
            cafile=pki / "ca.crt", certfile=pki / "broker.crt", keyfile=pki / "broker.key",
            run_as_root=hasattr(os, "geteuid") and os.geteuid() == 0,
        )

    proc, port, tls_port, _log = _start_mosquitto(conf, folder)
    try:
        yield Broker(port, tls_port, folder, passwords)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Client:
    """A paho-mqtt 2.x MQTT 5 client that records what happens to it, for tests."""

    def __init__(self, port: int, *, username: str | None = None, password: str | None = None,
                 client_id: str = "", tls: dict[str, Any] | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.port = port
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username is not None:
            self.c.username_pw_set(username, password)
        if tls is not None:
            self.c.tls_set(**tls)  # verifies the broker's certificate and its SAN against 127.0.0.1
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.connack: Any = None
        self.done = threading.Event()  # CONNACK received, or the connection is gone
        self.lost = threading.Event()
        self.suback: dict[int, list[Any]] = {}
        self.threaded = False
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = lambda _c, _u, m: self.messages.put((m.topic, m.payload, bool(m.retain)))
        self.c.on_subscribe = lambda _c, _u, mid, codes, _p: self.suback.__setitem__(mid, codes)

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self.connack = reason
        self.done.set()

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, _reason: Any, _props: Any) -> None:
        self.lost.set()
        self.done.set()

    def connect(self, background: bool = True) -> str:
        """'ok', or 'refused' with evidence (a TLS error, a failed CONNACK, a dropped connection).

        The network is driven from this thread until the CONNACK (paho's background thread would retry a
        refused login after a 1 s back-off); ``background`` then hands it to paho's thread."""
        try:
            self.c.connect("127.0.0.1", self.port, keepalive=30)
        except (OSError, ssl.SSLError):
            return "refused"
        self._drive(lambda: self.done.is_set(), "no CONNACK and no disconnect")
        if self.connack is None or self.connack.is_failure or self.lost.is_set():
            self.close()
            return "refused"
        if background:
            self.c.loop_start()
            self.threaded = True
        return "ok"

    def _drive(self, until: Any, what: str) -> None:
        deadline = time.monotonic() + WAIT
        while not until() and not self.lost.is_set():
            assert time.monotonic() < deadline, what
            try:
                self.c.loop(timeout=0.05)
            except (OSError, ssl.SSLError):
                self.lost.set()

    def subscribe(self, *filters: str) -> list[int]:
        """Subscribe and wait for the SUBACK; return its reason codes (0x87: not authorised)."""
        result, mid = self.c.subscribe([(f, 1) for f in filters])
        assert result == 0
        deadline = time.monotonic() + WAIT
        while mid not in self.suback:
            assert time.monotonic() < deadline, "no SUBACK"
            time.sleep(0.01)
        return [int(code.value) for code in self.suback[mid]]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT)
        assert info.is_published(), f"no PUBACK for {topic}"

    def forge(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish a message the ACL denies, from a client connected with ``background=False``, and close.

        mosquitto 2.0 may answer a denied publish by closing the connection (MQTT allows it), so wait for
        the PUBACK *or* the end of the connection: either way the broker has handled the message. (Hence
        one connection per forgery: after a disconnect, later ones would never reach the broker.) The
        network is driven from this thread, so paho never reconnects behind the test's back."""
        assert not self.threaded
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == 0, info.rc
        self._drive(info.is_published, f"neither PUBACK nor disconnect for {topic}")
        self.close()

    def receive_until(self, topic: str, payload: bytes) -> list[tuple[str, bytes, bool]]:
        """Every message up to and including (topic, payload); fails after WAIT seconds."""
        got: list[tuple[str, bytes, bool]] = []
        deadline = time.monotonic() + WAIT
        while True:
            try:
                msg = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"{topic} {payload!r} never arrived; got {got}")
            got.append(msg)
            if msg[:2] == (topic, payload):
                return got

    def close(self) -> None:
        self.c.disconnect()
        if self.threaded:
            self.c.loop_stop()
            self.threaded = False


@pytest.fixture
def clients(broker: Broker) -> Iterator[Any]:
    made: list[Client] = []

    def make(user: str | None, *, password: str | None = None, tls: dict[str, Any] | None = None,
             client_id: str = "", expect: str = "ok", background: bool = True) -> Client:
        if password is None and user is not None and tls is None:
            password = broker.passwords[user]
        # Over TLS the certificate names the user; a username is sent only when a test passes a password.
        username = user if tls is None or password is not None else None
        c = Client(broker.tls_port if tls else broker.port, username=username, password=password,
                   client_id=client_id, tls=tls)
        assert c.connect(background) == expect, (user, expect)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def _tls(broker: Broker, user: str | None, pki: Path | None = None) -> dict[str, Any]:
    pki = pki or broker.certs
    args: dict[str, Any] = {"ca_certs": str(broker.certs / "ca.crt")}
    if user is not None:
        args.update(certfile=str(pki / f"{user}.crt"), keyfile=str(pki / f"{user}.key"))
    return args


@needs_mosquitto
def test_device_talks_only_on_its_own_topics(clients: Any) -> None:
    coord = clients("coordinator", client_id="fedcmd-coordinator")
    status = topics.status_topic(FLEET)
    assert coord.subscribe(topics.updates_filter(FLEET), topics.presence_filter(FLEET), status) == [1, 1, 1]
    dev0 = clients("0", client_id="device-0")
    dev1 = clients("1", client_id="device-1")
    assert dev0.subscribe(topics.task_topic(FLEET, 0), status) == [1, 1]
    assert dev1.subscribe(topics.task_topic(FLEET, 1)) == [1]

    # Own update and (retained) presence reach the coordinator; its task and status reach device 0.
    dev0.publish(topics.presence_topic(FLEET, 0), b"online-0", retain=True)
    dev0.publish(topics.update_topic(FLEET, 0), b"update-0")
    got = coord.receive_until(topics.update_topic(FLEET, 0), b"update-0")
    assert [m[:2] for m in got] == [(topics.presence_topic(FLEET, 0), b"online-0"),
                                    (topics.update_topic(FLEET, 0), b"update-0")]
    coord.publish(topics.task_topic(FLEET, 0), b"task-0")
    coord.publish(status, b"status", retain=True)
    assert [m[:2] for m in dev0.receive_until(status, b"status")] == [
        (topics.task_topic(FLEET, 0), b"task-0"), (status, b"status")]
    coord.receive_until(status, b"status")
    dev0.close()

    # Device 0 cannot publish as device 1, nor on the coordinator's topics.
    for forgery in (
        (topics.update_topic(FLEET, 1), b"forged-update", False),
        (topics.presence_topic(FLEET, 1), b"forged-presence", True),
        (topics.task_topic(FLEET, 1), b"forged-task", False),
        (status, b"forged-status", True),
    ):
        clients("0", client_id="device-0", background=False).forge(*forgery)
    # The broker has handled the forgeries: whatever it routed to the coordinator or device 1 is queued
    # before these markers, which the coordinator sends now.
    coord.publish(status, b"barrier")
    coord.publish(topics.task_topic(FLEET, 1), b"task-1")
    assert [m[:2] for m in coord.receive_until(status, b"barrier")] == [(status, b"barrier")]
    assert [m[:2] for m in dev1.receive_until(topics.task_topic(FLEET, 1), b"task-1")] == [
        (topics.task_topic(FLEET, 1), b"task-1")]
    # The forged retained messages were not stored either: a new subscriber gets only the real ones.
    observer = clients("observer")
    assert observer.subscribe(topics.presence_filter(FLEET), status) == [1, 1]
    coord.publish(status, b"status-2", retain=True)  # a marker after the retained messages
    got = observer.receive_until(status, b"status-2")
    assert sorted(m[:2] for m in got) == [(topics.presence_topic(FLEET, 0), b"online-0"),
                                          (status, b"status"), (status, b"status-2")]

    # Device 0 cannot read device 1's task, asked for directly or by wildcard, nor anyone's update.
    # (mosquitto 2.0 grants such a SUBACK and checks the ACL on each delivery: what counts is what arrives.)
    reader = clients("0", client_id="device-0")
    reader.subscribe(topics.task_topic(FLEET, 1), f"fedcmd/{FLEET}/client/+/task", f"fedcmd/{FLEET}/#")
    coord.publish(topics.task_topic(FLEET, 1), b"secret-task-1")
    dev1.publish(topics.update_topic(FLEET, 1), b"update-1")
    coord.receive_until(topics.update_topic(FLEET, 1), b"update-1")  # the broker has routed both
    coord.publish(topics.task_topic(FLEET, 0), b"marker-task-0")
    got = reader.receive_until(topics.task_topic(FLEET, 0), b"marker-task-0")
    assert all("/client/1/" not in topic for topic, _, _ in got), got
    dev1.receive_until(topics.task_topic(FLEET, 1), b"secret-task-1")  # ... while device 1 gets its task


@needs_mosquitto
def test_refused_logins_and_no_session_takeover(broker: Broker, clients: Any) -> None:
    clients("0", password="wrong-" + broker.passwords["0"], expect="refused")
    clients("0", password=broker.passwords["1"], expect="refused")  # another device's password
    clients(None, expect="refused")  # anonymous
    clients("nobody", password="x", expect="refused")
    assert broker.passwords["coordinator"] != broker.passwords["0"]

    # use_username_as_clientid: device 0 asking for device 1's client id does not disconnect device 1.
    coord = clients("coordinator")
    dev1 = clients("1", client_id="device-1")
    dev1.subscribe(topics.task_topic(FLEET, 1))
    clients("0", client_id="device-1")
    coord.publish(topics.task_topic(FLEET, 1), b"still-there")
    dev1.receive_until(topics.task_topic(FLEET, 1), b"still-there")
    assert not dev1.lost.is_set()


@needs_mosquitto
def test_tls_with_client_certificates(broker: Broker, clients: Any, tmp_path: Path) -> None:
    coord = clients("coordinator", tls=_tls(broker, "coordinator"))
    status = topics.status_topic(FLEET)
    assert coord.subscribe(topics.updates_filter(FLEET), status) == [1, 1]
    # The certificate's CN is the username, so the ACL binds it like a password login.
    forger = clients(None, tls=_tls(broker, "0"), background=False)
    forger.forge(topics.update_topic(FLEET, 1), b"forged-over-tls")
    dev0 = clients(None, tls=_tls(broker, "0"), client_id="device-0")
    assert dev0.subscribe(topics.task_topic(FLEET, 0)) == [1]
    dev0.publish(topics.update_topic(FLEET, 0), b"tls-update")
    got = coord.receive_until(topics.update_topic(FLEET, 0), b"tls-update")
    assert [m[:2] for m in got if m[0] != status] == [(topics.update_topic(FLEET, 0), b"tls-update")]
    coord.publish(topics.task_topic(FLEET, 0), b"tls-task")
    dev0.receive_until(topics.task_topic(FLEET, 0), b"tls-task")

    # No client certificate, or one from another CA (even with a valid device CN): refused.
    clients(None, tls=_tls(broker, None), expect="refused")
    security.write_certs(tmp_path / "rogue", [0], fleet=FLEET)
    clients(None, tls=_tls(broker, "0", tmp_path / "rogue"), expect="refused")
    # A password alone does not open the certificate listener.
    clients("0", password=broker.passwords["0"], tls=_tls(broker, None), expect="refused")


@needs_mosquitto
def test_fleet_transport_through_the_secured_broker(broker: Broker) -> None:
    """The project's own MQTT transport, as the coordinator and agents use it: a password login and a
    certificate login, a chunked update (the ACL must allow every chunk)."""
    mqtt = pytest.importorskip("protocols.mqtt", reason="the MQTT transport (protocols/mqtt.py) is not there")
    MqttTransport, TlsConfig = mqtt.MqttTransport, mqtt.TlsConfig

    pki = broker.certs
    coord = MqttTransport(f"mqtt://127.0.0.1:{broker.port}", f"{FLEET}-coordinator", username="coordinator",
                          password=broker.passwords["coordinator"])
    got: list[tuple[str, bytes]] = []
    coord.subscribe(topics.updates_filter(FLEET), lambda t, b: got.append((t, b)))
    dev0 = MqttTransport(f"mqtts://127.0.0.1:{broker.tls_port}", f"{FLEET}-agent-0",
                         tls=TlsConfig(str(pki / "ca.crt"), str(pki / "0.crt"), str(pki / "0.key")))
    dev1 = MqttTransport(f"mqtt://127.0.0.1:{broker.port}", f"{FLEET}-agent-1", username="1",
                         password=broker.passwords["1"])
    try:
        big = os.urandom(700_000)  # above the transport's default packet limit: several chunks
        dev0.publish(topics.update_topic(FLEET, 0), big)
        dev1.publish(topics.update_topic(FLEET, 1), b"small")
        assert coord.run_until(lambda: len(got) >= 2, WAIT)
        assert sorted(got) == sorted([(topics.update_topic(FLEET, 0), big), (topics.update_topic(FLEET, 1), b"small")])
    finally:
        for t in (dev0, dev1, coord):
            t.close()
