"""deploy/: the systemd units, the production mosquitto config, the Docker files, proved where possible.

* Units: the shipped files are the renderer's output for deploy/fleet.toml; systemd itself parses them
  (``systemd --test`` loads units as PID 1 would and dumps every setting, no PID 1 needed) and must
  get back exactly the argv we meant, also for paths with spaces, quotes, ``%`` and ``$``;
  ``systemd-analyze verify`` accepts them without a single warning.
* mosquitto: the shipped config agrees with ``cloud.deploy.security.broker_config()`` and, started for real
  (paths and port rewritten), refuses plain MQTT and bad logins and enforces the fleet ACL.
* Docker: no daemon here; the compose file parses, everything it and the Dockerfile name exists, the
  torch pins are the Makefile's.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from test_security import WAIT, Client
from typer.testing import CliRunner

from cloud.cli.main import app
from cloud.deploy import security, systemd_units
from cloud.deploy.inventory import load_inventory, parse_inventory
from edge_agent.profiles import PROFILES
from protocols import topics
from protocols.broker import free_port, mosquitto_path
from protocols.chunking import DEFAULT_LIMIT

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SHIPPED_CONF = DEPLOY / "mosquitto" / "mosquitto.conf"
VENV = Path(sys.prefix)  # the venv running the tests: its bin/ holds fedcmd and fedcmd-edge
SYSTEMD = next((p for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd") if os.access(p, os.X_OK)), None)
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
FLEET = "lab"


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def render(text: str, prefix: str = systemd_units.DEFAULT_PREFIX) -> dict[str, str]:
    import tomllib

    return systemd_units.render_units(parse_inventory(tomllib.loads(text)), prefix)


# ------------------------------------------------------------------------------------- what systemd sees


def _systemd_test(text: str, name: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD is not None
    prefix: list[str] = []
    if os.geteuid() == 0:  # "Don't run test mode as root": as nobody, which must read the unit
        if shutil.which("setpriv") is None:
            pytest.skip("systemd --test refuses root, and setpriv (util-linux) is missing to drop it")
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    folder = Path(tempfile.mkdtemp(prefix="fedcmd-units-"))
    try:
        folder.chmod(0o755)
        (folder / name).write_text(text)
        (folder / name).chmod(0o644)
        # The trailing ':' keeps the default unit paths: the default dependencies (sysinit.target ...) live there.
        env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{folder}:", "SYSTEMD_LOG_LEVEL": "err"}
        return subprocess.run([*prefix, SYSTEMD, "--test", "--system", "--no-pager", f"--unit={name}"],
                              capture_output=True, text=True, env=env, timeout=60, cwd="/")
    finally:
        shutil.rmtree(folder)


def systemd_view(text: str, name: str = "fedcmd-test.service") -> dict[str, list[Any]]:
    """Every setting of unit ``text`` as systemd parsed it: ``systemd --test`` loads it like PID 1 and
    dumps it. ``ExecStart`` holds each command line as systemd would exec it (argv, ``$$`` -> ``$``)."""
    if SYSTEMD is None:
        pytest.skip("systemd is not installed")
    proc = _systemd_test(text, name)
    if proc.returncode != 0:
        probe = _systemd_test(f"[Service]\nExecStart={sys.executable}\n", "fedcmd-probe.service")
        if probe.returncode != 0:
            pytest.skip(f"systemd --test cannot run here: {(probe.stderr.strip().splitlines() or ['?'])[-1]}")
        pytest.fail(f"systemd --test fails on {name} (and not on a trivial unit):\n{proc.stderr[-2000:]}")
    settings: dict[str, list[Any]] = {}
    inside = in_exec = False
    for line in proc.stdout.splitlines():
        if line.startswith("\t-> Unit "):
            inside = line == f"\t-> Unit {name}:"
            continue
        if not inside:
            continue
        if line.startswith("\t\t-> "):
            in_exec = line == "\t\t-> ExecStart:"
        elif line.startswith("\t\t\tCommand Line: ") and in_exec:
            argv = [word.replace("$$", "$") for word in _split_dumped(line.split(": ", 1)[1])]
            settings.setdefault("ExecStart", []).append(argv)
        elif line.startswith("\t\t") and not line.startswith("\t\t\t"):
            key, _, value = line.strip().partition(": ")
            settings.setdefault(key, []).append(value)
    assert settings, f"{name} is not in the dump"
    return settings


def _split_dumped(line: str) -> list[str]:
    """A command line as systemd's dump quotes it: words, "..." around those that need it, C escapes."""
    words: list[str] = []
    i = 0
    while i < len(line):
        if line[i] == " ":
            i += 1
            continue
        word, quoted = [], False
        while i < len(line) and (quoted or line[i] != " "):
            if line[i] == '"':
                quoted = not quoted
            elif line[i] == "\\":
                i += 1
                assert line[i] in "\\\"'$", f"an escape we never produce: {line[i - 1:i + 3]!r}"
                word.append(line[i])
            else:
                word.append(line[i])
            i += 1
        words.append("".join(word))
    return words


NASTY = """\
[fleet]
name = "t-1"
broker = "mqtts://broker.example:8883"
data = "/srv/fed data/100%/$HOME/it's \\"x\\"\\\\y ${PATH};.npz"
credentials = "/etc/fed cmd"
state_dir = "/srv/state dir"
client_certs = true

[[device]]
id = 7
profile = "RPI5"
root = "/srv/données"

[[device]]
id = 8
host = "jetson-8"
profile = "jetson-nano"
dataset = "digits"
"""


def test_systemd_runs_exactly_the_argv_we_meant() -> None:
    """Paths with spaces, quotes, a backslash, '%', '$VAR', '${VAR}', ';' and UTF-8 reach the agent unchanged."""
    prefix = "/opt/fed cmd 100%"
    units = render(NASTY, prefix)
    assert sorted(units) == ["7/fedcmd-agent.service", "fedcmd-coordinator.service", "jetson-8/fedcmd-agent.service"]
    data = "/srv/fed data/100%/$HOME/it's \"x\"\\y ${PATH};.npz"
    view = systemd_view(units["7/fedcmd-agent.service"])
    assert view["ExecStart"] == [[
        f"{prefix}/bin/fedcmd-edge", "run", "--broker", "mqtts://broker.example:8883", "--fleet", "t-1",
        "--client-id", "7", "--profile", "rpi5", "--data", data, "--dataset", "mnist5k",
        "--root", "/srv/données", "--state-dir", "/srv/state dir",
        # client_certs: the certificate is the login, so no password file
        "--ca", "/etc/fed cmd/ca.crt", "--cert", "/etc/fed cmd/client.crt", "--key", "/etc/fed cmd/client.key",
    ]]
    assert view["MemoryMax"] == [str(PROFILES["rpi5"].memory_mb * 2**20)]
    assert view["ReadWritePaths"] == ["/srv/state dir"]
    assert view["StateDirectory"] == ["fedcmd"]  # outside /var/lib: the operator creates it
    for key, value in {"User": "fedcmd", "Group": "fedcmd", "Type": "exec", "Restart": "on-failure",
                       "KillSignal": "SIGTERM", "TimeoutStopSec": "2min", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
                       "LockPersonality": "yes", "MemoryDenyWriteExecute": "no", "ProtectControlGroups": "yes",
                       "ProtectKernelTunables": "yes", "SystemCallErrorNumber": "EPERM"}.items():
        assert view.get(key) == [value], (key, view.get(key))
    assert "chown" not in view["SystemCallFilter"][0].split() and "sched_setaffinity" in view["SystemCallFilter"][0]

    jetson = systemd_view(units["jetson-8/fedcmd-agent.service"])
    argv = jetson["ExecStart"][0]
    assert argv[argv.index("--dataset") + 1] == "digits" and "--root" not in argv
    assert jetson["MemoryMax"] == [str(PROFILES["jetson-nano"].memory_mb * 2**20)]

    coord = systemd_view(units["fedcmd-coordinator.service"])
    assert coord["ExecStart"] == [[f"{prefix}/bin/fedcmd", "cloud", "serve", "--config", "/etc/fedcmd/cloud.toml"]]
    assert coord["WorkingDirectory"] == ["/var/lib/fedcmd"] and coord["StateDirectory"] == ["fedcmd"]
    assert coord["User"] == ["fedcmd"] and coord["KillSignal"] == ["SIGTERM"]


def test_password_logins_and_state_below_var_lib() -> None:
    text = NASTY.replace("client_certs = true", "tls = false").replace('"/srv/state dir"', '"/var/lib/fedcmd/st"')
    text = text.replace('"mqtts://broker.example:8883"', '"mqtt://broker.example:1883"')  # plain MQTT: no TLS
    view = systemd_view(render(text)["7/fedcmd-agent.service"])
    argv = view["ExecStart"][0]
    assert argv[argv.index("--password-file") + 1] == "/etc/fed cmd/password"
    assert "--ca" not in argv and "--cert" not in argv
    # systemd creates a state dir below /var/lib/fedcmd itself, owned by the service user.
    assert view["StateDirectory"] == ["fedcmd", "fedcmd/st"] and view["ReadWritePaths"] == ["/var/lib/fedcmd/st"]


def test_quote_arg_refuses_what_systemd_cannot_carry() -> None:
    assert systemd_units.quote_arg("/a/b-c_d.e") == "/a/b-c_d.e"
    assert systemd_units.quote_arg("/a/100%") == "/a/100%%"
    assert systemd_units.quote_arg('a b"\\') == '"a b\\"\\\\"'
    assert systemd_units.quote_arg("") == '""'
    for bad in ("/a\nb", "/a\tb", "/a\x00b", "/a\x7fb"):
        with pytest.raises(systemd_units.UnitError, match="control character"):
            systemd_units.quote_arg(bad)


# ------------------------------------------------------------------------------------------ shipped units


def test_shipped_units_are_the_rendered_ones() -> None:
    units = systemd_units.render_units(load_inventory(DEPLOY / "fleet.toml"))
    inv = load_inventory(DEPLOY / "fleet.toml")
    first = inv.device[0]
    hint = ("regenerate: fedcmd deploy systemd --inventory deploy/fleet.toml --out /tmp/u --force && "
            f"cp /tmp/u/fedcmd-coordinator.service /tmp/u/{first.host}/fedcmd-agent.service deploy/systemd/")
    shipped = DEPLOY / "systemd"
    assert (shipped / "fedcmd-coordinator.service").read_text() == units["fedcmd-coordinator.service"], hint
    assert (shipped / "fedcmd-agent.service").read_text() == units[f"{first.host}/fedcmd-agent.service"], hint
    assert sorted(p.name for p in shipped.iterdir()) == ["fedcmd-agent.service", "fedcmd-coordinator.service"]
    # One unit per device, each with its own id and its profile's memory budget.
    for dev in inv.device:
        text = units[f"{dev.host}/fedcmd-agent.service"]
        assert f" --client-id {dev.id} " in text and f" --profile {dev.profile} " in text
        assert f"\nMemoryMax={PROFILES[dev.profile].memory_mb}M\n" in text
    assert " --data /data/fedcmd/partition.npz " in units["jetson-lab-03/fedcmd-agent.service"]


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    # Without --man=no verify would look up man pages; our units name none.
    return subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", unit.name], cwd=unit.parent,
                          capture_output=True, text=True, timeout=60)


def _verify_all(folder: Path) -> list[Path]:
    units = sorted(folder.rglob("*.service"))
    for unit in units:
        proc = _verify(unit)
        # Unknown keys and bad values are only warnings (exit 0): demand silence.
        if proc.returncode != 0 or proc.stdout.strip() or proc.stderr.strip():
            probe = folder / "probe" / "fedcmd-probe.service"
            probe.parent.mkdir(exist_ok=True)
            probe.write_text(f"[Service]\nExecStart={sys.executable}\n")
            trivial = _verify(probe)
            if trivial.returncode != 0 or trivial.stderr.strip():
                pytest.skip(f"systemd-analyze verify cannot run here: {trivial.stderr.strip()[-300:]}")
            pytest.fail(f"systemd-analyze verify {unit}:\n{proc.stdout}{proc.stderr}")
    return units


def _venv_copies(folder: Path) -> Path:
    """The shipped units with ExecStart pointing at this venv (verify checks that the program exists)."""
    folder.mkdir()
    for unit in (DEPLOY / "systemd").glob("*.service"):
        text = unit.read_text()
        assert f"ExecStart={systemd_units.DEFAULT_PREFIX}/bin/" in text
        venv_bin = systemd_units.quote_arg(f"{VENV}/bin/")
        (folder / unit.name).write_text(text.replace(f"ExecStart={systemd_units.DEFAULT_PREFIX}/bin/",
                                                     f"ExecStart={venv_bin}"))
    return folder


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """verify needs no PID 1, but it checks that ExecStart's program exists: the copies run this venv's."""
    if not (VENV / "bin" / "fedcmd-edge").exists():
        pytest.skip(f"no fedcmd-edge in {VENV} for ExecStart to point at")
    shipped = _venv_copies(tmp_path / "shipped")
    assert len(_verify_all(shipped)) == 2
    rendered = tmp_path / "rendered"
    result = cli("deploy", "systemd", "--inventory", str(DEPLOY / "fleet.toml"), "--out", str(rendered),
                 "--prefix", str(VENV))
    assert result.exit_code == 0, result.output
    assert len(_verify_all(rendered)) == 5
    # What verify does catch: a program that is not there, an unknown setting.
    for old, new, message in ((f"{VENV}/bin/", "/no/", "/no/fedcmd-edge"),
                              ("PrivateTmp=yes", "PrivateTemp=yes", "Unknown key 'PrivateTemp'")):
        bad = tmp_path / f"bad-{len(message)}" / "x.service"
        bad.parent.mkdir()
        bad.write_text((shipped / "fedcmd-agent.service").read_text().replace(old, new))
        assert message in _verify(bad).stderr


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_units_hardening_exposure(tmp_path: Path) -> None:
    """systemd's own hardening score of each unit (0 = locked down, 10 = exposed); 1.4 when written."""
    for unit in sorted(_venv_copies(tmp_path / "shipped").iterdir()):
        proc = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", unit.name],
                              cwd=unit.parent, capture_output=True, text=True, timeout=60)
        if "--offline" in proc.stderr or "unrecognized option" in proc.stderr:
            pytest.skip("systemd-analyze security --offline needs systemd 250 or later")
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
        assert m and float(m.group(1)) <= 2.0, (unit, proc.stdout[-2000:])
        for setting in ("NoNewPrivileges=", "ProtectSystem=", "PrivateDevices=", "SystemCallFilter=~@mount"):
            assert re.search(rf"✓ {re.escape(setting)}", proc.stdout), (unit, setting)


# -------------------------------------------------------------------------------------------- the command


def assert_user_error(result: Any, *contains: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(c in lines[0] for c in contains), lines[0]
    assert "Traceback" not in result.output and not isinstance(result.exception, (ValueError, OSError))


def test_deploy_systemd_writes_refuses_and_forces(tmp_path: Path) -> None:
    out = tmp_path / "units"
    result = cli("deploy", "systemd", "--inventory", str(DEPLOY / "fleet.toml"), "--out", str(out))
    assert result.exit_code == 0, result.output
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    hosts = ["jetson-lab-03", "pi-lab-00", "pi-lab-01", "pi-lab-02"]
    assert files == ["fedcmd-coordinator.service", *(f"{h}/fedcmd-agent.service" for h in hosts)]
    assert all((out / f).stat().st_mode & 0o777 == 0o644 for f in files)
    before = {f: (out / f).read_text() for f in files}
    assert_user_error(cli("deploy", "systemd", "-i", str(DEPLOY / "fleet.toml"), "-o", str(out)), "already exists",
                      "--force")
    (out / files[1]).write_text("edited")
    assert cli("deploy", "systemd", "-i", str(DEPLOY / "fleet.toml"), "-o", str(out), "--force").exit_code == 0
    assert {f: (out / f).read_text() for f in files} == before

    inventory = tmp_path / "fleet.toml"
    cases = [
        (NASTY.replace('"/etc/fed cmd"', '"/etc/fed\\ncmd"'), "control character"),  # TOML \n: a real newline
        (NASTY.replace('host = "jetson-8"', 'host = "../etc"'), "cannot name the folder"),
        (NASTY.replace('host = "jetson-8"', 'host = "7"'), "already device 7's"),
    ]
    for text, message in cases:
        inventory.write_text(text)
        assert_user_error(cli("deploy", "systemd", "-i", str(inventory), "-o", str(tmp_path / "new")), message)
    inventory.write_text(NASTY)
    assert_user_error(cli("deploy", "systemd", "-i", str(inventory), "-o", str(tmp_path / "new"), "--prefix", "opt"),
                      "absolute path")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(cli("deploy", "systemd", "-i", str(inventory), "-o", str(blocker)), "cannot write")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------- mosquitto


def _directives(text: str) -> list[list[tuple[str, str]]]:
    """A mosquitto config as [global settings, listener 1 settings, ...], comments dropped."""
    sections: list[list[tuple[str, str]]] = [[]]
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if key == "listener":
            sections.append([])
        sections[-1].append((key, value.strip()))
    return sections


def _generated(cert_identity: bool) -> list[list[tuple[str, str]]]:
    etc = Path("/etc/mosquitto/fedcmd")
    return _directives(security.broker_config(
        password_file=etc / "mosquitto.passwd", acl_file=etc / "mosquitto.acl", port=None, tls_port=8883,
        cafile=etc / "ca.crt", certfile=etc / "broker.crt", keyfile=etc / "broker.key", cert_identity=cert_identity,
    ))


def test_shipped_mosquitto_conf_agrees_with_broker_config() -> None:
    shipped, ours = _directives(SHIPPED_CONF.read_text()), _generated(cert_identity=False)
    assert len(shipped) == len(ours) == 2, "one listener: TLS"
    # Global settings: broker_config's (protocols.broker.mosquitto_config's: packet size and logging
    # included), except persistence (production keeps retained messages and sessions).
    extra = dict.fromkeys(("persistence_location", "autosave_interval"))
    want = [d for d in ours[0] if d != ("persistence", "false")] + [("persistence", "true")]
    assert sorted(d for d in shipped[0] if d[0] not in extra) == sorted(want)
    got = dict(shipped[0])
    assert got["max_queued_messages"] == "0" and got["allow_anonymous"] == "false"
    assert int(got["max_packet_size"]) >= DEFAULT_LIMIT + 1024, "the transport's chunks must fit"
    # The listener: the same settings; on every interface in production, not on the loopback.
    assert shipped[1][0] == ("listener", "8883") and ours[1][0][0] == "listener"
    assert sorted(shipped[1][1:]) == sorted(ours[1][1:])
    # The certificate-login variant its comments describe is broker_config's cert_identity=True.
    cert = _generated(cert_identity=True)[1]
    changed = sorted(set(cert) - set(ours[1]))
    assert changed == [("require_certificate", "true"), ("use_identity_as_username", "true")]
    text = SHIPPED_CONF.read_text()
    assert all(f"#   {k} {v}\n" in text for k, v in changed)


def _test_conf(folder: Path, port: int) -> str:
    """The shipped config with only its paths and port changed (and `user root` when we are root)."""
    text = SHIPPED_CONF.read_text()
    for old, new in (("/etc/mosquitto/fedcmd/", f"{folder}/"),
                     ("persistence_location /var/lib/mosquitto/", f"persistence_location {folder}/data/"),
                     ("\nlistener 8883\n", f"\nlistener {port} 127.0.0.1\n")):
        assert old in text, old
        text = text.replace(old, new)
    # As root mosquitto would drop to user `mosquitto`, who cannot read pytest's 0700 folders.
    return text + ("user root\n" if os.geteuid() == 0 else "")


@pytest.fixture
def shipped_broker(tmp_path: Path) -> Iterator[tuple[int, Path, dict[str, str]]]:
    exe = mosquitto_path()
    if exe is None:
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto mosquitto-clients)")
    pytest.importorskip("cryptography")
    folder = tmp_path / "etc"
    security.write_certs(folder, [3, 4], fleet=FLEET)  # ca.crt, broker.crt/.key, ... as the config names them
    security.write_users(folder / "mosquitto.passwd", [3, 4], password_dir=tmp_path / "cred")
    security.write_acl(folder / "mosquitto.acl", FLEET)
    (folder / "data").mkdir()
    passwords = {p.stem: p.read_text().strip() for p in (tmp_path / "cred").iterdir()}
    log = tmp_path / "mosquitto.log"
    for _ in range(3):  # a free port can be taken before mosquitto binds it
        port = free_port()
        conf = tmp_path / "mosquitto.conf"
        conf.write_text(_test_conf(folder, port))
        with log.open("wb") as sink:
            proc = subprocess.Popen([exe, "-c", str(conf)], stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            break
        if "Address already in use" not in log.read_text(errors="replace"):
            pytest.fail(f"mosquitto did not start with the shipped config:\n{log.read_text(errors='replace')}")
    try:
        yield port, folder, passwords
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_shipped_mosquitto_conf_on_a_real_broker(shipped_broker: tuple[int, Path, dict[str, str]]) -> None:
    port, folder, pw = shipped_broker
    ca = {"ca_certs": str(folder / "ca.crt")}  # the client checks the broker's certificate and its SAN
    made: list[Client] = []

    def connect(user: str | None, password: str | None = None, *, tls: bool = True, client_id: str = "",
                background: bool = True) -> tuple[Client, str]:
        c = Client(port, username=user, password=password, client_id=client_id, tls=ca if tls else None)
        made.append(c)
        return c, c.connect(background)

    def client(user: str, *, client_id: str = "", background: bool = True) -> Client:
        c, result = connect(user, pw[user], client_id=client_id, background=background)
        assert result == "ok", user
        return c

    try:
        # Refused: plain MQTT (no TLS, so not even a CONNACK), then TLS logins the broker itself turns down.
        plain, result = connect("3", pw["3"], tls=False)
        assert result == "refused" and plain.connack is None
        for user, password in ((None, None), ("3", None), ("3", "wrong"), ("3", pw["4"]), ("coordinator", pw["3"])):
            c, result = connect(user, password)
            assert result == "refused" and c.connack is not None and c.connack.is_failure, (user, c.connack)

        coord = client("coordinator", client_id=f"{FLEET}-coordinator")
        status = topics.status_topic(FLEET)
        assert coord.subscribe(topics.updates_filter(FLEET), topics.presence_filter(FLEET), status) == [1, 1, 1]
        dev4 = client("4", client_id=f"{FLEET}-agent-4")
        assert dev4.subscribe(topics.task_topic(FLEET, 4)) == [1]

        # Device 3 cannot publish as device 4 (one connection per forgery: mosquitto may drop the sender).
        for topic, payload in ((topics.update_topic(FLEET, 4), b"forged-update"),
                               (topics.presence_topic(FLEET, 4), b"forged-presence"),
                               (topics.task_topic(FLEET, 4), b"forged-task")):
            client("3", client_id=f"{FLEET}-agent-3", background=False).forge(topic, payload)
        coord.publish(status, b"barrier")
        assert [m[:2] for m in coord.receive_until(status, b"barrier")] == [(status, b"barrier")]
        coord.publish(topics.task_topic(FLEET, 4), b"task-4")  # the coordinator publishes tasks
        assert [m[:2] for m in dev4.receive_until(topics.task_topic(FLEET, 4), b"task-4")] == [
            (topics.task_topic(FLEET, 4), b"task-4")]

        # Device 3 reads its own task, never device 4's (mosquitto grants the SUBACK, filters each delivery).
        dev3 = client("3", client_id=f"{FLEET}-agent-3")
        dev3.subscribe(topics.task_topic(FLEET, 3), topics.task_topic(FLEET, 4))
        coord.publish(topics.task_topic(FLEET, 4), b"secret-task-4")
        coord.publish(topics.task_topic(FLEET, 3), b"task-3")
        assert [m[:2] for m in dev3.receive_until(topics.task_topic(FLEET, 3), b"task-3")] == [
            (topics.task_topic(FLEET, 3), b"task-3")]
        dev4.receive_until(topics.task_topic(FLEET, 4), b"secret-task-4")
        # ... and publishes its own update, which the coordinator receives.
        dev3.publish(topics.update_topic(FLEET, 3), b"update-3")
        coord.receive_until(topics.update_topic(FLEET, 3), b"update-3")
        dev3.close()
        coord.close()  # one connection per user (use_username_as_clientid): make way for the next
        _chunked_update_through(port, folder, pw)
    finally:
        for c in made:
            c.close()


def _chunked_update_through(port: int, folder: Path, pw: dict[str, str]) -> None:
    """The fleet's own transport: an update several chunks long passes the packet limit and the ACL."""
    from protocols.mqtt import MqttTransport, TlsConfig

    url, tls = f"mqtts://127.0.0.1:{port}", TlsConfig(str(folder / "ca.crt"))
    coord = MqttTransport(url, f"{FLEET}-coordinator", username="coordinator", password=pw["coordinator"], tls=tls)
    got: list[tuple[str, bytes]] = []
    coord.subscribe(topics.updates_filter(FLEET), lambda t, b: got.append((t, b)))
    dev3 = MqttTransport(url, f"{FLEET}-agent-3", username="3", password=pw["3"], tls=tls)
    try:
        big = os.urandom(3 * DEFAULT_LIMIT)
        dev3.publish(topics.update_topic(FLEET, 3), big)
        assert coord.run_until(lambda: bool(got), WAIT)
        assert got == [(topics.update_topic(FLEET, 3), big)]
    finally:
        dev3.close()
        coord.close()


# ---------------------------------------------------------------------------------------------- Docker


def _makefile_pins() -> dict[str, str]:
    text = (ROOT / "Makefile").read_text()
    m = re.search(r"ifeq \(\$\(ARCH\),aarch64\)\nTORCH_PINS := (.+)\nelse\nTORCH_PINS := (.+)\nendif", text)
    assert m, "Makefile: the TORCH_PINS block changed shape"
    return {"aarch64": m.group(1).strip(), "other": m.group(2).strip()}


def _dockerfile_pins(text: str) -> dict[str, str]:
    m = re.search(r'aarch64\) pins="([^"]+)" ;;.*?\*\) pins="([^"]+)" ;;', text, re.S)
    assert m, "deploy/Dockerfile: the pins case changed shape"
    return {"aarch64": m.group(1), "other": m.group(2)}


def test_dockerfile_pins_sources_and_stages() -> None:
    import tomllib

    text = (DEPLOY / "Dockerfile").read_text()
    assert _dockerfile_pins(text) == _makefile_pins()
    assert all("==" in pin for pins in _makefile_pins().values() for pin in pins.split())  # never unpinned
    assert 'pip install $(cat /opt/fedcmd/torch-pins.txt) ".[full]"' in text  # the coordinator's stack
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", text, re.M)
    assert stages == [("python:3.11-slim", "build"), ("python:3.11-slim", "")]
    final = text.split("\nFROM python:3.11-slim\n", 1)[1]
    assert "build-essential" not in final and "cmake" not in final  # compilers stay in the build stage
    assert "\nUSER fedcmd\n" in final and 'ENTRYPOINT ["fedcmd", "cloud", "serve"]' in final
    # Everything COPY takes from the context exists, is not .dockerignored, and covers what the wheel needs.
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copied: list[str] = []
    for args in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        *sources, _dest = args.split()
        copied += sources
    for src in copied:
        assert (ROOT / src).exists(), src
        assert not any(PurePosixPath(src).match(p.removeprefix("**/")) for p in ignored), src
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", "CMakeLists.txt", project["project"]["readme"], "csrc",
              *project["tool"]["scikit-build"]["wheel"]["packages"]}
    assert needed <= set(copied), needed - set(copied)
    for must in (".venv", "build", "runs", ".git"):
        assert must in ignored


def _mount(volume: str) -> tuple[str, str, str]:
    """A short-syntax volume ``SOURCE:TARGET[:MODE]`` (SOURCE may hold ``${VAR:-default}``)."""
    m = re.fullmatch(r"((?:\$\{[^}]*\}|[^:$])+):([^:]+)(?::(\w+))?", volume)
    assert m, volume
    return m.group(1), m.group(2), m.group(3) or "rw"


def test_compose_file() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"mosquitto", "coordinator"}
    broker, coord = services["mosquitto"], services["coordinator"]
    assert broker["image"] == "eclipse-mosquitto:2"
    assert broker["restart"] == "unless-stopped" and coord["restart"] == "on-failure"
    # The broker runs the shipped config: mounted where the command line reads it.
    mounts = {target: (source, mode) for source, target, mode in map(_mount, broker["volumes"])}
    conf_target = next(t for t, (s, _) in mounts.items() if s.endswith("mosquitto.conf"))
    assert (DEPLOY / mounts[conf_target][0]).resolve() == SHIPPED_CONF.resolve()
    assert mounts[conf_target][1] == "ro" and f"-c {conf_target}" in broker["entrypoint"][-1]
    # Every file the shipped config reads lies in a mounted folder; its persistence is on a volume.
    settings = dict(kv for section in _directives(SHIPPED_CONF.read_text()) for kv in section)
    for key in ("password_file", "acl_file", "cafile", "certfile", "keyfile"):
        assert str(PurePosixPath(settings[key]).parent) in mounts, key
    assert settings["persistence_location"].rstrip("/") in mounts
    assert "8883:8883" in broker["ports"]
    # Every file the compose file and the build name exists; operator folders come from $FEDCMD_HOST_DIR.
    build = coord["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT and (context / build["dockerfile"]).is_file()
    assert coord["command"] == ["--config", "/etc/fedcmd/cloud.toml"]
    named = set(compose["volumes"])
    for service in services.values():
        for volume in service["volumes"]:
            source = _mount(volume)[0]
            if source.startswith("${FEDCMD_HOST_DIR"):
                continue  # written by `fedcmd deploy certs|users|acl` on the host (deploy/README.md)
            assert source in named or (DEPLOY / source).exists(), volume
    assert {"broker-data", "coordinator-state"} <= named


def test_cloud_status_reads_the_shipped_tls_broker_as_observer(shipped_broker: tuple[int, Path, dict[str, str]],
                                                               tmp_path: Path) -> None:
    """`fedcmd cloud status` with --ca/--username/--password-file, against the TLS + password + ACL broker."""
    import json

    from typer.testing import CliRunner

    from cloud.cli.main import app
    from protocols.mqtt import connect
    from protocols.topics import status_topic

    port, folder, _ = shipped_broker
    url = f"mqtts://localhost:{port}"
    cred = tmp_path / "cred"
    with connect(url, "coordinator", username="coordinator", password_file=cred / "coordinator.password",
                 ca=folder / "ca.crt") as coordinator:
        coordinator.publish(status_topic(FLEET), json.dumps({"state": "running", "next_round": 7}).encode(),
                            retain=True)
    args = ["cloud", "status", "--broker", url, "--fleet", FLEET, "--ca", str(folder / "ca.crt"), "--timeout", "5"]
    ok = CliRunner().invoke(app, [*args, "--username", "observer", "--password-file", str(cred / "observer.password")])
    assert ok.exit_code == 0, ok.output
    assert "running" in ok.output and "7" in ok.output
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    refused = CliRunner().invoke(app, [*args, "--username", "observer", "--password-file", str(wrong)])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "not authori" in refused.output.lower() or "bad user name or password" in refused.output.lower(), \
        refused.output
