"""Broker security for a fedcmd fleet: TLS certificates, the mosquitto password file and ACL.

Identity convention (see deploy/mosquitto/README.md):

* a device's MQTT **username is its decimal client id** (``"0"``, ``"17"``), the same string the topic
  scheme puts in ``fedcmd/<fleet>/client/<id>/...``; its TLS client certificate has that string as CN.
  So one ACL ``pattern`` line with ``%u`` binds every device to its own topics, and a device added later
  needs no ACL change (with certificate identity, not even a broker file change).
* the coordinator is user ``coordinator``, a read-only monitor (``fedcmd cloud status``) is ``observer``;
  neither is all digits, so neither can collide with a device.
* the ACL never uses ``%c``: MQTT client ids are chosen by the client, not authenticated. The suggested
  broker config sets ``use_username_as_clientid true`` so that a device cannot take over (disconnect)
  another device's session by reusing its client id; agents may ask for ``device-<id>``, the broker then
  knows them as ``<id>``.

Everything here is library code: user mistakes raise :class:`SecurityError` with a one-line message,
and every writer stages all its files before renaming any, so a failure leaves nothing half-written.
The ``cryptography`` package is imported only by the certificate functions.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocols import topics
from protocols.broker import Listener, mosquitto_config

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

COORDINATOR_USER = "coordinator"
OBSERVER_USER = "observer"
SERVICE_USERS = (COORDINATOR_USER, OBSERVER_USER)
MAX_DEVICES = 100_000  # a typo such as --count 1000000 should fail fast, not write a million keys

# mosquitto 2.0 "$7$" hashes: PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte digest (as mosquitto_passwd).
# mosquitto_passwd uses 101 iterations; ours are higher although the generated passwords carry 256 bits
# of entropy (stretching adds nothing there), because operators may add human passwords to the file.
PBKDF2_ITERATIONS = 1000
SALT_BYTES = 12

KEY_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
CA_DAYS = 3650
# Edge boards without a real-time clock boot with a stale time until NTP syncs; back-dating the start
# of validity by a day keeps their first connection from failing on "certificate not yet valid".
BACKDATE = dt.timedelta(days=1)

class SecurityError(ValueError):
    """A user mistake; the message is one line, fit for the command line."""


# ----------------------------------------------------------------------------------------------- naming


def device_username(client_id: int) -> str:
    """The MQTT username (and certificate CN) of device ``client_id``: its id in decimal."""
    if client_id < 0:
        raise SecurityError(f"client ids are non-negative, got {client_id}")
    return str(client_id)


def parse_device_ids(devices: str | None, count: int | None) -> list[int]:
    """Client ids from ``--devices 0,1,5-9`` or ``--count N`` (ids 0..N-1); exactly one of them."""
    if (devices is None) == (count is None):
        raise SecurityError("give exactly one of --devices (e.g. 0,1,2 or 0-9) and --count")
    if count is not None:
        if not 1 <= count <= MAX_DEVICES:
            raise SecurityError(f"--count must be between 1 and {MAX_DEVICES}, got {count}")
        return list(range(count))
    assert devices is not None
    ids: list[int] = []
    for item in (part.strip() for part in devices.split(",")):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", item)
        if not m:
            raise SecurityError(
                f"bad device list {devices!r}: {item!r} is not a client id or a range like 3-7 "
                "(ids are non-negative integers)"
            )
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise SecurityError(f"bad device list {devices!r}: empty range {item!r}")
        if len(ids) + hi - lo + 1 > MAX_DEVICES:
            raise SecurityError(f"bad device list {devices!r}: more than {MAX_DEVICES} devices")
        ids.extend(range(lo, hi + 1))
    seen: set[int] = set()
    for i in ids:
        if i in seen:
            raise SecurityError(f"bad device list {devices!r}: device {i} is listed twice")
        seen.add(i)
    return ids


def check_fleet(fleet: str, *, allow_any: bool = False) -> str:
    """A fleet name as the topic scheme accepts it (``+`` = every fleet, where allowed)."""
    if allow_any and fleet == "+":
        return fleet
    try:
        return topics.check_fleet(fleet)
    except ValueError:
        hint = " (or + for every fleet)" if allow_any else ""
        raise SecurityError(f"bad fleet name {fleet!r}: use 1-64 letters, digits, '_', '-', '.'{hint}") from None


# -------------------------------------------------------------------------------------------- file output


@dataclass(frozen=True)
class OutFile:
    path: Path
    data: bytes
    mode: int
    overwrite: bool = False  # True: replacing it is part of the plan (e.g. --add to a password file)


def write_files(files: Sequence[OutFile], *, force: bool) -> list[Path]:
    """Write all ``files`` or none: refuse existing ones without ``force``, stage every file as a
    temporary next to its target (created with its final mode, so a key is never readable by others,
    not even for a moment), fsync, then rename them all into place."""
    for f in files:
        if f.path.is_dir():
            raise SecurityError(f"{f.path} is a directory")
    existing = [f.path for f in files if not f.overwrite and os.path.lexists(f.path)]
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise SecurityError(f"{existing[0]} already exists{more}; pass --force to overwrite")
    created_dirs: list[Path] = []
    staged: list[tuple[Path, Path]] = []
    try:
        for f in files:
            created_dirs.extend(_make_dirs(f.path.parent))
            tmp = f.path.with_name(f".{f.path.name}.tmp-{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, f.mode)
            staged.append((tmp, f.path))
            try:
                os.fchmod(fd, f.mode)  # the umask must not tighten it: certificates stay world-readable
                view = memoryview(f.data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        for tmp, path in staged:
            os.replace(tmp, path)
    except OSError as exc:
        for tmp, _ in staged:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        for d in reversed(created_dirs):
            try:
                d.rmdir()
            except OSError:
                pass
        targets = {str(tmp): path for tmp, path in staged}
        where = targets.get(str(exc.filename), exc.filename) or (staged[-1][1] if staged else files[0].path)
        raise SecurityError(f"cannot write {where}: {exc.strerror or exc}") from None
    for parent in {f.path.parent for f in files}:
        _fsync_dir(parent)
    return [f.path for f in files]


def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p that reports what it created (0700: these folders hold keys and passwords)."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise NotADirectoryError(20, "Not a directory", str(p))
    for d in reversed(missing):
        os.mkdir(d, 0o700)
    return list(reversed(missing))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- passwords


def generate_password() -> str:
    """256 random bits, URL-safe (no ':' or whitespace, so it survives config files and URLs)."""
    return secrets.token_urlsafe(32)


def hash_password(password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """mosquitto 2.0's ``$7$<iterations>$<b64 salt>$<b64 PBKDF2-HMAC-SHA512>``."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """Check ``password`` against a mosquitto hash: ``$7$`` (2.0, PBKDF2) or ``$6$`` (1.x, salted SHA-512)."""
    parts = encoded.strip().split("$")
    try:
        if len(parts) == 5 and parts[:2] == ["", "7"]:
            iterations = int(parts[2])
            salt, want = base64.b64decode(parts[3], validate=True), base64.b64decode(parts[4], validate=True)
            got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=len(want))
        elif len(parts) == 4 and parts[:2] == ["", "6"]:
            salt, want = base64.b64decode(parts[2], validate=True), base64.b64decode(parts[3], validate=True)
            got = hashlib.sha512(password.encode() + salt).digest()
        else:
            return False
    except ValueError:  # bad base64 or iteration count: a corrupt entry never verifies
        return False
    return hmac.compare_digest(got, want)


def parse_password_file(text: str, source: str = "the password file") -> dict[str, str]:
    """``username -> hash`` from a mosquitto password file (blank lines and ``#`` comments skipped)."""
    users: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        if not sep or not user or not encoded.startswith("$"):
            raise SecurityError(f"line {n} of {source} is not 'username:$<type>$...'")
        users[user] = encoded
    return users


def format_password_file(users: dict[str, str]) -> str:
    """Service users first, then devices in id order, so diffs of the file stay readable."""
    order = sorted(users, key=lambda u: (u not in SERVICE_USERS, not u.isdigit(), int(u) if u.isdigit() else 0, u))
    return "".join(f"{u}:{users[u]}\n" for u in order)


@dataclass
class UsersResult:
    password_file: Path
    credential_files: list[Path]
    added: list[str]
    kept: list[str]


def write_users(
    out: Path,
    device_ids: Iterable[int],
    *,
    password_dir: Path | None = None,
    add: bool = False,
    force: bool = False,
    iterations: int = PBKDF2_ITERATIONS,
) -> UsersResult:
    """Generate passwords for the coordinator, the observer and ``device_ids``; write the mosquitto
    password file ``out`` and one 0600 ``<password_dir>/<username>.password`` per new user.

    ``add`` keeps the entries of an existing ``out`` (new devices join a running fleet without
    changing anyone's password); a listed device already in it is refused unless ``force`` (rotation)."""
    password_dir = out.parent / "credentials" if password_dir is None else password_dir
    existing: dict[str, str] = {}
    if add and out.exists():
        try:
            existing = parse_password_file(out.read_text(), str(out))
        except (OSError, UnicodeDecodeError) as exc:
            raise SecurityError(f"cannot read {out}: {getattr(exc, 'strerror', None) or exc}") from None
    devices = [device_username(i) for i in device_ids]
    if add:
        clash = [u for u in devices if u in existing]
        if clash and not force:
            raise SecurityError(
                f"device {clash[0]} is already in {out}; pass --force to give it a new password"
            )
        wanted = [u for u in SERVICE_USERS if u not in existing] + devices
    else:
        wanted = [*SERVICE_USERS, *devices]
    users = dict(existing)
    files: list[OutFile] = []
    for user in wanted:
        password = generate_password()
        users[user] = hash_password(password, iterations=iterations)
        files.append(OutFile(password_dir / f"{user}.password", f"{password}\n".encode(), KEY_FILE_MODE))
    # Hashes are not passwords, but they allow offline guessing: the broker user alone should read them.
    files.insert(0, OutFile(out, format_password_file(users).encode(), KEY_FILE_MODE, overwrite=add))
    write_files(files, force=force)
    return UsersResult(out, [f.path for f in files[1:]], wanted, [u for u in existing if u not in wanted])


# ------------------------------------------------------------------------------------------------- ACL


def acl_text(fleet: str = "+") -> str:
    """mosquitto ACL: each device its own update/presence (write) and task (read), plus the fleet status;
    the coordinator every update/presence (read), every task and the status (write)."""
    fleet = check_fleet(fleet, allow_any=True)
    base = f"fedcmd/{fleet}"
    return f"""\
# fedcmd mosquitto ACL (written by `fedcmd deploy acl`; fleet: {fleet}).
# Devices: username = decimal client id (TLS: certificate CN, with use_identity_as_username true).
# `pattern` lines apply to every authenticated user, %u being the username. Client ids (%c) are not
# used on purpose: a client chooses its own id, while its username is authenticated.
# Anything not granted here is denied: a denied publish is dropped (mosquitto 2.0 may also close the
# connection), a denied subscription delivers nothing.

pattern write {base}/client/%u/update
pattern write {base}/client/%u/presence
pattern read {base}/client/%u/task
# No %u: mosquitto warns about this line at start; it is the way to grant a topic to every user
# (`topic` lines before any `user` line would apply to anonymous clients only).
pattern read {base}/status

user {COORDINATOR_USER}
topic read {base}/client/+/update
topic read {base}/client/+/presence
topic write {base}/client/+/task
# readwrite: the coordinator reads back its own retained status when it restarts.
topic readwrite {base}/status

user {OBSERVER_USER}
topic read {base}/status
topic read {base}/client/+/presence
"""


def write_acl(out: Path, fleet: str = "+", *, force: bool = False) -> Path:
    # Not secret, but the broker user must read it: 0644.
    write_files([OutFile(out, acl_text(fleet).encode(), PUBLIC_FILE_MODE)], force=force)
    return out


# ------------------------------------------------------------------------------------------ certificates


@dataclass
class CertsResult:
    written: list[Path]
    reused_ca: bool


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _new_key(key_type: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise SecurityError(f"unknown key type {key_type!r}: use ec (P-256) or rsa (2048)")


def _name(common_name: str, fleet: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcmd"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, fleet),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _make_ca(fleet: str, key_type: str, days: int) -> tuple[x509.Certificate, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _new_key(key_type)
    now = dt.datetime.now(dt.timezone.utc)
    name = _name(f"fedcmd {fleet} CA", fleet)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        # path_length 0: this CA signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SecurityError(f"cannot load the existing CA {cert_path} / {key_path}: {exc}") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise SecurityError(f"{key_path} is not the key of {cert_path}; move both away to start a new CA")
    if cert.not_valid_after_utc <= dt.datetime.now(dt.timezone.utc):
        raise SecurityError(f"the CA {cert_path} has expired; move ca.crt and ca.key away to start a new CA")
    return cert, key


def _issue(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    common_name: str,
    fleet: str,
    key_type: str,
    days: int,
    *,
    server_names: Sequence[str] = (),
    server_ips: Sequence[str] = (),
) -> tuple[x509.Certificate, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = _new_key(key_type)
    now = dt.datetime.now(dt.timezone.utc)
    server = bool(server_names or server_ips)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, fleet))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        # A leaf never outlives its CA (verifiers would reject the chain from that day on anyway).
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=key_type == "rsa",
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        # Python 3.13's default TLS context (VERIFY_X509_STRICT) rejects leaves without an AKI.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
    alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
    if not server:
        # mosquitto takes the identity from the CN; the URI only satisfies verifiers that, like RFC 5280
        # profiles in cryptography's or Go's, want a subjectAltName in every end-entity certificate.
        alt.append(x509.UniformResourceIdentifier(f"urn:fedcmd:{fleet}:user:{common_name}"))
    builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _cert_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _split_list(value: str | Sequence[str]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else [p for v in value for p in v.split(",")]
    return [p.strip() for p in items if p.strip()]


def check_hosts(broker_hosts: str | Sequence[str], broker_ips: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """Validate the broker's DNS names and IP addresses (its certificate's subjectAltName)."""
    hosts, ips = _split_list(broker_hosts), _split_list(broker_ips)
    for h in hosts:
        # A DNS name (optionally a leading wildcard label); IPs belong in --broker-ip.
        if not re.fullmatch(r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]"
                            r"([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", h) or h.replace(".", "").isdigit():
            raise SecurityError(f"bad broker host {h!r}: give a DNS name (put IP addresses in --broker-ip)")
    for ip in ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise SecurityError(f"bad broker IP address {ip!r}") from None
    if not hosts and not ips:
        raise SecurityError("the broker certificate needs at least one --broker-host or --broker-ip")
    return hosts, ips


def write_certs(
    out_dir: Path,
    device_ids: Sequence[int],
    *,
    fleet: str = "default",
    broker_hosts: str | Sequence[str] = "localhost",
    broker_ips: str | Sequence[str] = "127.0.0.1",
    days: int = 825,
    ca_days: int = CA_DAYS,
    key_type: str = "ec",
    devices_only: bool = False,
    force: bool = False,
) -> CertsResult:
    """Issue PEM certificates into ``out_dir``: ``ca.crt``/``ca.key`` (created, or reused when both
    exist: the CA key is never replaced, whatever ``force`` says), ``broker.crt``/``.key`` (SAN = the
    broker's names and IPs), ``coordinator.crt``/``.key`` and ``<username>.crt``/``.key`` per device
    (CN = username). Keys are 0600. ``devices_only`` issues only the device files (adding devices)."""
    fleet = check_fleet(fleet)
    hosts, ips = check_hosts(broker_hosts, broker_ips) if not devices_only else ([], [])
    if not 1 <= days <= 3650 or not 1 <= ca_days <= 36500:
        raise SecurityError(f"--days must be 1..3650 and --ca-days 1..36500, got {days} and {ca_days}")
    if key_type not in ("ec", "rsa"):
        raise SecurityError(f"unknown key type {key_type!r}: use ec (P-256) or rsa (2048)")
    if out_dir.exists() and not out_dir.is_dir():
        raise SecurityError(f"{out_dir} exists and is not a directory")
    ca_crt, ca_key_path = out_dir / "ca.crt", out_dir / "ca.key"
    have = [p.exists() for p in (ca_crt, ca_key_path)]
    if any(have) and not all(have):
        present, absent = (ca_crt, ca_key_path) if have[0] else (ca_key_path, ca_crt)
        raise SecurityError(f"{present} exists but {absent} does not; restore it, or move both away for a new CA")
    reused = all(have)
    files: list[OutFile] = []
    if reused:
        ca_cert, ca_key = _load_ca(ca_crt, ca_key_path)
    elif devices_only:
        raise SecurityError(f"--devices-only needs the existing CA (ca.crt and ca.key) in {out_dir}")
    else:
        ca_cert, ca_key = _make_ca(fleet, key_type, ca_days)
        files += [OutFile(ca_crt, _cert_pem(ca_cert), PUBLIC_FILE_MODE), OutFile(ca_key_path, _key_pem(ca_key),
                                                                                 KEY_FILE_MODE)]
    leaves: list[tuple[str, dict[str, Any]]] = []
    if not devices_only:
        leaves.append(("broker", {"common_name": hosts[0] if hosts else ips[0], "server_names": hosts,
                                  "server_ips": ips}))
        leaves.append((COORDINATOR_USER, {"common_name": COORDINATOR_USER}))
    leaves += [(device_username(i), {"common_name": device_username(i)}) for i in device_ids]
    # Refuse before generating anything: a refused run of 1,000 RSA keys should not take a minute.
    if not force:
        for stem, _ in leaves:
            for suffix in (".crt", ".key"):
                if os.path.lexists(out_dir / f"{stem}{suffix}"):
                    raise SecurityError(f"{out_dir / (stem + suffix)} already exists; pass --force to overwrite")
    for stem, kw in leaves:
        cert, key = _issue(ca_cert, ca_key, fleet=fleet, key_type=key_type, days=days, **kw)
        files.append(OutFile(out_dir / f"{stem}.crt", _cert_pem(cert), PUBLIC_FILE_MODE))
        files.append(OutFile(out_dir / f"{stem}.key", _key_pem(key), KEY_FILE_MODE))
    return CertsResult(write_files(files, force=force), reused)


# --------------------------------------------------------------------------------------- broker config


def broker_config(
    *,
    password_file: Path | None,
    acl_file: Path | None,
    port: int | None = 1883,
    bind: str = "127.0.0.1",
    tls_port: int | None = None,
    tls_bind: str | None = None,
    cafile: Path | None = None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    cert_identity: bool = True,
    run_as_root: bool = False,
    extra: Sequence[str] = (),
) -> str:
    """A mosquitto 2.0 config for a fleet broker: a password listener on ``port`` and/or a TLS listener on
    ``tls_port``. ``cert_identity``: TLS clients must present a certificate from ``cafile`` and its CN
    is their username (no password); otherwise TLS only encrypts and clients log in with a password.
    Only the deploy side lives here (which files, which listeners); the settings themselves come from
    :func:`protocols.broker.mosquitto_config`, the one generator."""
    listeners: list[Listener] = []
    if port is not None:
        listeners.append(Listener(port, bind, username_as_clientid=True))
    if tls_port is not None:
        if cafile is None or certfile is None or keyfile is None:
            raise SecurityError("a TLS listener needs cafile, certfile and keyfile")
        listeners.append(Listener(tls_port, tls_bind or bind, tls=(cafile, certfile, keyfile),
                                  cert_identity=cert_identity, username_as_clientid=True))
    return mosquitto_config(
        listeners, password_file=password_file, acl_file=acl_file, run_as_root=run_as_root,
        header="# fedcmd broker (see deploy/mosquitto/README.md)", extra=extra,
    )
