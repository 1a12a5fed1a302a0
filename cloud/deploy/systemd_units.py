"""systemd units for a fleet: the coordinator's, and one agent unit per device of an inventory.

Pure functions, no files: :func:`render_units` maps an :class:`~cloud.deploy.inventory.Inventory` to
``{relative path: unit text}``; ``fedcmd deploy systemd`` writes that mapping. The shipped
``deploy/systemd/*.service`` files are this module's output for ``deploy/fleet.toml`` (device 0 for the
agent), and tests/test_deploy_artifacts.py keeps them equal, so the two cannot drift apart.

Every value that ends up in a unit goes through :func:`quote_arg`: systemd splits ``ExecStart=`` on
whitespace, unquotes, C-unescapes, expands ``%`` specifiers and ``$`` variables; a path must come out of
that as the same string it went in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import PurePosixPath

from cloud.deploy.inventory import Device, Inventory

DEFAULT_PREFIX = "/opt/fedcmd"  # the venv fedcmd is installed in: PREFIX/bin/fedcmd, PREFIX/bin/fedcmd-edge
CLOUD_CONFIG = "/etc/fedcmd/cloud.toml"
STATE_NAME = "fedcmd"  # StateDirectory=fedcmd -> /var/lib/fedcmd, owned by the service user
STATE_ROOT = f"/var/lib/{STATE_NAME}"
USER = "fedcmd"
COORDINATOR_UNIT = "fedcmd-coordinator.service"
AGENT_UNIT = "fedcmd-agent.service"

# Characters that need no quoting in an ExecStart= word ('%' and '$' are still doubled, see quote_arg).
_PLAIN = re.compile(r"[A-Za-z0-9_@%$+=:,./-]+")
# A unit folder per device is named after its host (or id): one path component, nothing hidden.
_FOLDER = re.compile(r"[A-Za-z0-9_:][A-Za-z0-9._:-]*")


class UnitError(ValueError):
    """A value systemd cannot carry, or an inventory the units cannot be laid out for; one line."""


def quote_arg(value: str, what: str = "value") -> str:
    """``value`` as one word of a unit setting such as ``ExecStart=``: ``%`` -> ``%%`` (specifiers),
    ``$`` -> ``$$`` (environment expansion), double quotes with ``\\`` and ``"`` escaped around
    anything beyond plain path characters. Control characters (newlines, tabs, ...) are refused: no
    real path holds one, and a newline would end the setting."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise UnitError(f"{what} {value!r} contains a control character (newline, tab, ...) systemd cannot carry")
    escaped = value.replace("%", "%%").replace("$", "$$")
    if value and _PLAIN.fullmatch(value):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_line(argv: Iterable[tuple[str, str]]) -> str:
    """``(word, what it is)`` pairs -> the text after ``ExecStart=``."""
    return " ".join(quote_arg(word, what) for word, what in argv)


def _check_prefix(prefix: str) -> str:
    if not PurePosixPath(prefix).is_absolute():
        raise UnitError(f"--prefix {prefix!r} must be an absolute path (the venv fedcmd is installed in)")
    return prefix.rstrip("/") or "/"


def agent_argv(inv: Inventory, dev: Device, prefix: str = DEFAULT_PREFIX) -> list[tuple[str, str]]:
    """``fedcmd-edge run`` for ``dev``, each word paired with what it is (for error messages)."""
    from edge_agent.profiles import ProfileError, get_profile

    try:
        profile = get_profile(dev.profile)
    except ProfileError as e:
        raise UnitError(f"[[device]] id {dev.id}: {e}") from None
    fleet, cred = inv.fleet, PurePosixPath(inv.fleet.credentials)
    argv = [
        (f"{_check_prefix(prefix)}/bin/fedcmd-edge", "--prefix"), ("run", ""),
        ("--broker", ""), (fleet.broker, "[fleet] broker"),
        ("--fleet", ""), (fleet.name, "[fleet] name"),
        ("--client-id", ""), (str(dev.id), "id"),
        ("--profile", ""), (profile.name, "profile"),
        ("--data", ""), (inv.data_of(dev), f"[[device]] id {dev.id}: data"),
        ("--dataset", ""), (inv.dataset_of(dev), f"[[device]] id {dev.id}: dataset"),
    ]
    root = inv.root_of(dev)
    if root is not None:
        argv += [("--root", ""), (root, f"[[device]] id {dev.id}: root")]
    argv += [("--state-dir", ""), (fleet.state_dir, "[fleet] state_dir")]
    # With client certificates the certificate is the login (its CN the username): no password file.
    if not fleet.client_certs:
        argv += [("--password-file", ""), (str(cred / "password"), "[fleet] credentials")]
    if fleet.tls or fleet.client_certs:
        argv += [("--ca", ""), (str(cred / "ca.crt"), "[fleet] credentials")]
    if fleet.client_certs:
        argv += [("--cert", ""), (str(cred / "client.crt"), "[fleet] credentials"),
                 ("--key", ""), (str(cred / "client.key"), "[fleet] credentials")]
    return argv


# ------------------------------------------------------------------------------------------ unit text

_USER = f"""\
# A static system user (useradd --system fedcmd), not DynamicUser=: the credentials in /etc/fedcmd are
# provisioned before the first start and must stay readable by one fixed group (root:fedcmd 0640), and
# the data and state outlive reinstalls. A dynamic user exists only while the unit runs; its way to
# secrets (LoadCredential=, systemd 247) is missing on JetPack 5's Ubuntu 20.04 (systemd 245).
User={USER}
Group={USER}
UMask=0027
"""

_HARDENING = """\
# Hardening. Writable: the state directory only (ProtectSystem=strict makes the rest read-only).
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# systemd 247+ (older ones log "unknown key" and go on): other users' processes are invisible.
ProtectProc=invisible
PrivateMounts=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
CapabilityBoundingSet=
# Off on purpose: torch's oneDNN compiles its CPU kernels at run time into memory that is written, then
# made executable. Under the same W^X rule (prctl PR_SET_MDWE, Linux 6.3+) a LeNet-5 conv2d fails with
# "could not create a primitive" (torch 2.14.1, x86_64). Not measured on aarch64: off there as well rather
# than risk boards that fail their first round.
MemoryDenyWriteExecute=no
# A torch training step, an ONNX export and an MQTT/TLS session (strace -f) use only @system-service
# calls and none of @privileged; anything else fails with EPERM instead of killing the process.
# (@resources stays: torch's OpenMP pins threads with sched_setaffinity and mbind.)
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM
"""

_INSTALL = """\

[Install]
WantedBy=multi-user.target
"""


def coordinator_unit(prefix: str = DEFAULT_PREFIX, config: str = CLOUD_CONFIG) -> str:
    """The coordinator's unit: ``fedcmd cloud serve --config CONFIG`` as user fedcmd in /var/lib/fedcmd."""
    argv = [(f"{_check_prefix(prefix)}/bin/fedcmd", "--prefix"), ("cloud", ""), ("serve", ""),
            ("--config", ""), (config, "config")]
    return f"""\
# fedcmd coordinator. Rendered by `fedcmd deploy systemd` (cloud/deploy/systemd_units.py); install: deploy/README.md.
# Relative paths in cloud.toml (checkpoint, out) resolve in the state directory /var/lib/fedcmd.
[Unit]
Description=fedcmd coordinator (federated learning over MQTT)
# Ordered after a broker on the same host when there is one; not required (it may run elsewhere).
After=network-online.target mosquitto.service
Wants=network-online.target
# `fedcmd cloud serve` exits 3 when the broker stays unreachable for 30 s or too few devices come online
# (restarted), 2 on a mistake in its config (not restarted: RestartPreventExitStatus). After 5 failed
# starts in 10 minutes systemd gives up (fix, then `systemctl reset-failed` and start): a coordinator that
# crashes at the same round every time thus stops re-running it against the fleet.
StartLimitIntervalSec=10min
StartLimitBurst=5

[Service]
Type=exec
{_USER}ExecStart={exec_line(argv)}
WorkingDirectory={STATE_ROOT}
Environment=HOME={STATE_ROOT} PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec=15s
RestartPreventExitStatus=2
# On SIGTERM the coordinator publishes the retained status "stopped" and exits 0; it checkpoints after
# every round (write, fsync, rename) and resumes from the last checkpoint, re-running the interrupted round.
# A finished run exits 0 and stays stopped.
KillSignal=SIGTERM
TimeoutStopSec=30s
StateDirectory={STATE_NAME}
StateDirectoryMode=0750
ReadWritePaths={quote_arg(STATE_ROOT)}
# No MemoryMax=: the coordinator keeps one model body per client, so its size is the fleet's choice.
{_HARDENING}PrivateDevices=yes
{_INSTALL}"""


def _state_directories(state_dir: str) -> str:
    """``StateDirectory=`` entries: fedcmd, plus the state dir when it lies below /var/lib/fedcmd (systemd
    then creates it, owned by the service user; elsewhere it must exist, ReadWritePaths= needs it)."""
    rel = PurePosixPath(state_dir).relative_to("/var/lib") if state_dir.startswith(STATE_ROOT + "/") else None
    if rel is not None and re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*", str(rel)) and ".." not in rel.parts:
        return f"{STATE_NAME} {rel}"
    return STATE_NAME


def agent_unit(inv: Inventory, dev: Device, prefix: str = DEFAULT_PREFIX) -> str:
    """One device's unit: ``fedcmd-edge run`` with its id, profile, data, credentials; MemoryMax from the
    profile's memory budget."""
    from edge_agent.profiles import get_profile

    argv = agent_argv(inv, dev, prefix)  # validates the profile too
    profile = get_profile(dev.profile)
    where = f" on {dev.host}" if dev.host else ""
    gpu = ""
    if profile.cuda:
        gpu = (
            "# A Jetson: local training runs on the CPU (fedcmd_core puts no tensors on a GPU yet), so the GPU\n"
            "# stays hidden. To hand it to the agent: PrivateDevices=no and SupplementaryGroups=video\n"
            "# (/dev/nvhost-*, /dev/nvmap belong to group video on L4T).\n"
        )
    return f"""\
# fedcmd edge agent, device {dev.id} of fleet {inv.fleet.name}{where} (profile {profile.name}).
# Rendered by `fedcmd deploy systemd --inventory fleet.toml` (cloud/deploy/systemd_units.py): change the
# inventory and render again rather than editing this file. Install: deploy/README.md.
[Unit]
Description=fedcmd edge agent (fleet {inv.fleet.name}, device {dev.id}, {profile.name})
# time-sync.target: boards without a real-time clock boot with a stale date, and TLS checks certificate
# dates (it waits only where systemd-time-wait-sync is enabled; Restart= covers the rest).
After=network-online.target time-sync.target
Wants=network-online.target
# Never give up: an unattended device must come back by itself after a broker or network outage of any
# length (the agent exits when the broker is unreachable at start, or no coordinator answers within
# --wait). RestartSec keeps a permanent mistake to one attempt per 30 s; the journal says what it is.
StartLimitIntervalSec=0

[Service]
Type=exec
{_USER}ExecStart={exec_line(argv)}
Environment=HOME={STATE_ROOT} PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec=30s
# SIGTERM: the agent finishes the task in hand (its update still counts for the round), publishes its
# "offline" presence and disconnects. A local fit on a slow board can take a while; after TimeoutStopSec
# SIGKILL is safe too: state files are written atomically and the broker publishes the last will.
KillSignal=SIGTERM
TimeoutStopSec=120s
StateDirectory={_state_directories(inv.fleet.state_dir)}
StateDirectoryMode=0750
ReadWritePaths={quote_arg(inv.fleet.state_dir, "[fleet] state_dir")}
# The profile's budget ({profile.memory_mb} MB); the agent refuses runs it estimates above it, this stops
# the rest (the kernel OOM-kills the agent rather than the board swapping to a halt).
MemoryMax={profile.memory_mb}M
{_HARDENING}{gpu}PrivateDevices=yes
{_INSTALL}"""


def unit_folder(dev: Device) -> str:
    """The folder of ``dev``'s unit in the output: its host name, else its id."""
    name = dev.host if dev.host is not None else str(dev.id)
    if not _FOLDER.fullmatch(name):
        raise UnitError(
            f"[[device]] id {dev.id}: host {name!r} cannot name the folder of its unit "
            "(one path component of letters, digits, '.', '-', '_', ':')"
        )
    return name


def render_units(inv: Inventory, prefix: str = DEFAULT_PREFIX) -> dict[str, str]:
    """``{relative path: text}``: ``<host or id>/fedcmd-agent.service`` per device and
    ``fedcmd-coordinator.service`` once."""
    units = {COORDINATOR_UNIT: coordinator_unit(prefix)}
    owner: dict[str, int] = {}
    for dev in inv.device:
        folder = unit_folder(dev)
        if folder in owner or folder == COORDINATOR_UNIT:
            other = f"device {owner[folder]}" if folder in owner else "the coordinator unit"
            raise UnitError(f"[[device]] id {dev.id}: its unit folder {folder!r} is already {other}'s")
        owner[folder] = dev.id
        units[f"{folder}/{AGENT_UNIT}"] = agent_unit(inv, dev, prefix)
    return units
