"""The emulated Raspberry Pi: a Debian bookworm arm64 rootfs run under qemu user-mode emulation (binfmt).

Cache (outside the clone): ``$FEDCMD_HIL_ARM_CACHE``, default ``~/.cache/fedcmd/hil-arm/``::

    base-<hash>/rootfs/     debootstrap --variant=minbase: python3, venv, pip, g++, cmake, make (no python3-dev)
    base-<hash>/COMPLETE    written last; a folder without it is a killed build and is rebuilt
    agent-<hash>/upper/     overlay on base: deploy/rpi/install-agent.sh system + install (the agent venv
                            /opt/fedcmd with torch 2.9.1 and fedcmd[full]) and the wheel build venv
    wheels/<source hash>/   the aarch64 wheel built inside the rootfs from that source tree
    .building-*             layers being built (a temp folder per builder pid, renamed into place when done)

Each layer's hash covers its recipe (a recipe version of this file, deploy/rpi/install-agent.sh,
pyproject.toml's dependency lists, the suite, the mirror and the package lists): a changed recipe builds a new layer and
deletes the old one. A session mounts an overlay with a private upper folder on top (:class:`SessionRoot`),
so what a test does never touches the cache; the current source's wheel is installed there with
``--no-deps`` (it is rebuilt, ~3 min, only when the source changed).

Command line (``make hil-arm`` / ``make wheels`` use it)::

    python tests/hil/arm_rootfs.py check     # one line: why this machine cannot emulate aarch64, or "ok"
    python tests/hil/arm_rootfs.py build     # the layers (cold: ~10 min on 2 cores)
    python tests/hil/arm_rootfs.py wheel --out dist
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO / "deploy" / "rpi" / "install-agent.sh"
SUITE = "bookworm"
BASE_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates,g++,cmake,make"
BUILD_REQUIRES = "scikit-build-core>=0.10 pybind11>=2.12"  # pyproject.toml's [build-system] requires
AGENT_PREFIX = "/opt/fedcmd"
BUILD_VENV = "/opt/fedcmd-build"
# What goes into the wheel: its hash names the wheel cache entry.
WHEEL_SOURCES = (
    "pyproject.toml",
    "CMakeLists.txt",
    "README.md",
    "csrc",
    "cloud",
    "edge_agent",
    "fedcmd_core",
    "protocols",
)
INSTALL_HINT = "apt-get install -y qemu-user-static binfmt-support debootstrap"
BINFMT = Path("/proc/sys/fs/binfmt_misc")


class ArmError(RuntimeError):
    """A one-line reason the emulated device cannot be made (missing tool, failed build step)."""


def cache_dir() -> Path:
    return Path(os.environ.get("FEDCMD_HIL_ARM_CACHE", "~/.cache/fedcmd/hil-arm")).expanduser()


def mirror() -> str:
    """The Debian mirror apt on this machine uses (deb822 or one-line sources), else deb.debian.org."""
    texts = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            texts.append(p.read_text(errors="replace"))
    for text in texts:
        for m in re.finditer(r"(?m)^\s*(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text):
            uri = m.group(1).rstrip("/")
            if uri.startswith(("http://", "https://")) and "security" not in uri:
                return uri
    return "http://deb.debian.org/debian"


# ------------------------------------------------------------------------------------------ checks
def why_unavailable() -> str | None:
    """Why this machine cannot run aarch64 binaries (one line naming what to install), or None."""
    if sys.platform != "linux":
        return "the emulated aarch64 device needs Linux (qemu user-mode + binfmt_misc)"
    if os.geteuid() != 0:
        return "the emulated aarch64 device needs root (debootstrap, chroot, mounts)"
    if os.uname().machine == "aarch64":
        return None  # native: nothing to emulate
    missing = [t for t in ("debootstrap", "qemu-aarch64-static") if shutil.which(t) is None]
    if missing:
        return f"{' and '.join(missing)} not found: {INSTALL_HINT}"
    if not (BINFMT / "status").exists():
        return f"binfmt_misc is not mounted: mount -t binfmt_misc binfmt_misc {BINFMT} (or {INSTALL_HINT})"
    entry = BINFMT / "qemu-aarch64"
    try:
        text = entry.read_text()
    except OSError:
        return "no qemu-aarch64 binfmt entry: update-binfmts --enable qemu-aarch64 (package binfmt-support)"
    if not text.startswith("enabled"):
        return "the qemu-aarch64 binfmt entry is disabled: update-binfmts --enable qemu-aarch64"
    flags = re.search(r"(?m)^flags:\s*(\S*)", text)
    if flags is None or "F" not in flags.group(1):
        return (
            "the qemu-aarch64 binfmt entry lacks the F flag (a chroot cannot see the interpreter): "
            "reinstall qemu-user-static, then update-binfmts --enable qemu-aarch64"
        )
    return None


def require() -> None:
    reason = why_unavailable()
    if reason:
        raise ArmError(reason)


# ------------------------------------------------------------------------------------------ hashes
def _digest(parts: Sequence[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:16]


# Bump when the steps of _build_base / _build_agent change (their inputs below are hashed anyway).
BASE_RECIPE = "base-1"
AGENT_RECIPE = "agent-1"


def base_hash() -> str:
    return _digest([BASE_RECIPE.encode(), SUITE.encode(), mirror().encode(), BASE_PACKAGES.encode()])


def _dependencies() -> bytes:
    """What the agent venv's content depends on in pyproject.toml: the dependency lists, not the tools' config."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: tomli (in the full extra)
        import tomli as tomllib  # type: ignore[no-redef]

    project = tomllib.loads((REPO / "pyproject.toml").read_text()).get("project", {})
    deps = {
        "dependencies": project.get("dependencies"),
        "optional": project.get("optional-dependencies"),
        "requires-python": project.get("requires-python"),
    }
    return json.dumps(deps, sort_keys=True).encode()


def agent_hash() -> str:
    return _digest(
        [
            AGENT_RECIPE.encode(),
            base_hash().encode(),
            INSTALL_SCRIPT.read_bytes(),
            _dependencies(),
            BUILD_REQUIRES.encode(),
            AGENT_PREFIX.encode(),
        ]
    )


def source_files() -> list[Path]:
    """The files of the wheel's sources that git tracks or would track (ignored files left out)."""
    proc = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *WHEEL_SOURCES],
        capture_output=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise ArmError(f"git ls-files failed in {REPO}: {proc.stderr.decode(errors='replace').strip()}")
    names = sorted({n for n in proc.stdout.decode().split("\0") if n})
    return [REPO / n for n in names if (REPO / n).is_file()]


def source_hash() -> str:
    parts: list[bytes] = []
    for f in source_files():
        parts += [str(f.relative_to(REPO)).encode(), f.read_bytes()]
    return _digest(parts)


# ------------------------------------------------------------------------------------------ running
def _log(msg: str) -> None:
    print(f"[hil-arm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _run(argv: Sequence[str], what: str, timeout: float = 3600, log: Path | None = None, **kw: object) -> None:
    """Run a build step; its output goes to ``log`` and, on failure, its tail into the one-line error."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.run(list(argv), stdout=out, stderr=subprocess.STDOUT, timeout=timeout, **kw)  # type: ignore[call-overload]
    except subprocess.TimeoutExpired:
        raise ArmError(f"{what}: timed out after {timeout:.0f} s (log: {log})") from None
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    if proc.returncode != 0:
        tail = ""
        if log:
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            tail = f"; last line: {lines[-1].strip()[:300]}" if lines else ""
        raise ArmError(f"{what} failed (exit {proc.returncode}, log: {log}){tail}")


CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "PIP_DEFAULT_TIMEOUT": "180",
    "PIP_NO_CACHE_DIR": "1",
}


def _ids_in(root: Path, user: str) -> tuple[int, int]:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise ArmError(f"no user {user!r} in {root}/etc/passwd (install-agent.sh system creates fedcmd)")


def chroot_argv(
    root: Path, argv: Sequence[str], user: str | None = None, extra_env: dict[str, str] | None = None
) -> list[str]:
    """``argv`` run inside ``root`` with a clean environment (the host's PIP_* settings stay outside)."""
    env = [f"{k}={v}" for k, v in {**CHROOT_ENV, **(extra_env or {})}.items()]
    spec = []
    if user:  # numeric ids from the rootfs's own passwd (chroot would look a name up on this machine)
        uid, gid = _ids_in(root, user)
        spec = [f"--userspec={uid}:{gid}", f"--groups={gid}"]
    return ["env", "-i", *env, "chroot", *spec, str(root), *argv]


def sh(root: Path, script: str, what: str, log: Path | None = None, timeout: float = 3600) -> None:
    _run(chroot_argv(root, ["/bin/sh", "-ec", script]), what, timeout=timeout, log=log)


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=60)


def _copy_host_network_files(root: Path) -> None:
    """pip and apt inside need this machine's CA bundle (a proxy may re-sign) and resolver."""
    for src, dst in (
        ("/etc/ssl/certs/ca-certificates.crt", "etc/ssl/certs/ca-certificates.crt"),
        ("/etc/resolv.conf", "etc/resolv.conf"),
    ):
        target = root / dst
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        with contextlib.suppress(OSError):
            shutil.copyfile(src, target)


def mount_view(merged: Path, lowers: Sequence[Path], upper: Path | None) -> list[Path]:
    """Mount ``lowers`` (top first) with ``upper`` as a writable overlay at ``merged`` (a bind mount when
    there is one lower and no upper), and /proc, /sys inside; the mount points to unmount, last first."""
    merged.mkdir(parents=True, exist_ok=True)
    if upper is None and len(lowers) == 1:
        _run(["mount", "--bind", str(lowers[0]), str(merged)], f"bind mount {lowers[0]}")
    else:
        opts = f"lowerdir={':'.join(map(str, lowers))}"
        if upper is not None:
            work = upper.parent / f"{upper.name}.work"
            upper.mkdir(parents=True, exist_ok=True)
            work.mkdir(parents=True, exist_ok=True)
            opts += f",upperdir={upper},workdir={work}"
        _run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], f"overlay mount at {merged}")
    mounted = [merged]
    try:
        # Fresh proc and sysfs instances, no submounts, and NOT this machine's /dev: the rootfs keeps the
        # device nodes debootstrap made (null, zero, urandom, tty...). A view left mounted by a killed process
        # and then deleted with rmtree (pytest's old temp folders) must not reach this machine's /dev or its
        # cgroup hierarchies; proc and sysfs entries cannot be unlinked.
        for fs, args in (("proc", ["-t", "proc", "proc"]), ("sys", ["-t", "sysfs", "sysfs"])):
            point = merged / fs
            point.mkdir(exist_ok=True)
            _run(["mount", *args, str(point)], f"mount /{fs} in {merged}")
            mounted.append(point)
    except BaseException:
        for p in reversed(mounted):
            _umount(p)
        raise
    return mounted


def unmount_all(points: Sequence[Path]) -> None:
    for p in reversed(points):
        _umount(p)


@contextlib.contextmanager
def view(lowers: Sequence[Path], upper: Path | None, scratch: Path) -> Iterator[Path]:
    merged = scratch / "merged"
    points = mount_view(merged, lowers, upper)
    try:
        yield merged
    finally:
        unmount_all(points)


# ------------------------------------------------------------------------------------------ layers
def _complete(layer: Path, digest: str) -> bool:
    try:
        meta = json.loads((layer / "COMPLETE").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("hash") == digest


def _lock() -> contextlib.AbstractContextManager[None]:
    @contextlib.contextmanager
    def held() -> Iterator[None]:
        cache_dir().mkdir(parents=True, exist_ok=True)
        with open(cache_dir() / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # one builder at a time; a second waits, then finds the layer built
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    return held()


def _clear(path: Path) -> None:
    """Remove a half-built or stale layer; whatever is still mounted inside it is unmounted first."""
    mounts = [ln.split()[1] for ln in Path("/proc/self/mounts").read_text().splitlines()]
    for m in sorted((m for m in mounts if m.startswith(f"{path}/")), key=len, reverse=True):
        _umount(Path(m))
    shutil.rmtree(path, ignore_errors=True)


def _remove_stale(name: str, keep: Path) -> list[str]:
    removed = []
    for p in cache_dir().glob(f"{name}-*"):
        if p != keep and p.is_dir():
            _clear(p)
            removed.append(p.name)
    for p in cache_dir().glob(f".building-{name}-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            _clear(p)
            removed.append(p.name)
    return removed


def _layer(name: str, digest: str, build: object) -> Path:
    final = cache_dir() / f"{name}-{digest}"
    if _complete(final, digest):
        return final
    with _lock():
        if _complete(final, digest):
            return final
        if final.exists():
            _log(f"{final} is incomplete (a build was killed): rebuilding it")
        for r in _remove_stale(name, keep=cache_dir() / "_none_"):
            _log(f"removed {r}")
        tmp = cache_dir() / f".building-{name}-{digest}-{os.getpid()}"
        _clear(tmp)
        tmp.mkdir(parents=True)
        t0 = time.monotonic()
        _log(f"building {name} layer {digest} in {tmp} (log: {tmp}/build.log)")
        build(tmp)  # type: ignore[operator]
        seconds = time.monotonic() - t0
        (tmp / "COMPLETE").write_text(
            json.dumps({"hash": digest, "seconds": round(seconds, 1), "built": time.strftime("%Y-%m-%dT%H:%M:%S")})
        )
        os.rename(tmp, final)
        _log(f"{name} layer done in {seconds:.0f} s: {final}")
        return final


def _build_base(tmp: Path) -> None:
    rootfs, log = tmp / "rootfs", tmp / "build.log"
    _run(
        [
            "debootstrap",
            "--arch=arm64",
            "--variant=minbase",
            f"--include={BASE_PACKAGES}",
            SUITE,
            str(rootfs),
            mirror(),
        ],
        "debootstrap of the arm64 rootfs",
        log=log,
        timeout=3600,
    )
    _copy_host_network_files(rootfs)
    with view([rootfs], None, tmp / "scratch") as root:
        sh(root, "apt-get clean; rm -rf /var/lib/apt/lists/*", "apt clean", log=log)
        # a working aarch64 python is what the device is for: check it before calling the layer done
        sh(root, "test \"$(uname -m)\" = aarch64 && python3 -c 'import venv, ssl'", "aarch64 python check", log=log)


def base_layer() -> Path:
    require()
    return _layer("base", base_hash(), _build_base)


def _copy_source(root: Path, dest: str = "tmp/fedcmd-src") -> str:
    target = root / dest
    shutil.rmtree(target, ignore_errors=True)
    for f in source_files():
        out = target / f.relative_to(REPO)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, out)
    return "/" + dest


def _build_wheel_in(root: Path, log: Path) -> Path:
    """Build the fedcmd wheel of the current source inside a mounted agent view; its path on this machine."""
    src = _copy_source(root)
    jobs = os.cpu_count() or 1
    # The CMake tree persists in the cache (per agent layer: one compiler), mounted where scikit-build-core
    # puts it (build/{wheel_tag} of the copied source, whose files keep their times): a change of the
    # Python sources only re-packs the wheel, a C++ change recompiles what it touches (emulated: minutes).
    # Without pybind11's link-time optimisation: its LTO link alone took ~30 min under emulation (measured);
    # the kernels' own flags (-O3, NEON baseline) are unchanged, and `pip install .` on a real Pi keeps LTO.
    tree = cache_dir() / "wheel-build" / agent_hash()
    tree.mkdir(parents=True, exist_ok=True)
    for stale in tree.parent.iterdir():
        if stale != tree:
            shutil.rmtree(stale, ignore_errors=True)
    point = root / src.lstrip("/") / "build"
    point.mkdir(exist_ok=True)
    _run(["mount", "--bind", str(tree), str(point)], "bind mount of the wheel build tree")
    try:
        sh(
            root,
            f"rm -rf /tmp/wheel && CMAKE_BUILD_PARALLEL_LEVEL={jobs} {BUILD_VENV}/bin/pip wheel -q --no-deps "
            "--no-build-isolation --config-settings=cmake.define.CMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF "
            f"-w /tmp/wheel {src}",
            "building the aarch64 wheel",
            log=log,
        )
    finally:
        _umount(point)
    wheels = sorted((root / "tmp" / "wheel").glob("fedcmd-*.whl"))
    if len(wheels) != 1 or "aarch64" not in wheels[0].name:
        raise ArmError(f"the wheel build left {[w.name for w in wheels]} instead of one aarch64 wheel (log: {log})")
    return wheels[0]


def _store_wheel(wheel: Path, digest: str) -> Path:
    folder = cache_dir() / "wheels" / digest
    tmp = folder.parent / f".{digest}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(wheel, tmp / wheel.name)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    return folder / wheel.name


def _build_agent(tmp: Path) -> None:
    base = cache_dir() / f"base-{base_hash()}"  # agent_layer() made it before taking the lock
    log = tmp / "build.log"
    with view([base / "rootfs"], tmp / "upper", tmp / "scratch") as root:
        _copy_host_network_files(root)
        shutil.copy2(INSTALL_SCRIPT, root / "tmp" / "install-agent.sh")
        sh(root, "sh /tmp/install-agent.sh system", "install-agent.sh system", log=log)
        sh(
            root,
            f"python3 -m venv {BUILD_VENV} && {BUILD_VENV}/bin/pip install -q {BUILD_REQUIRES}",
            "the wheel build venv",
            log=log,
        )
        digest = source_hash()
        wheel = _build_wheel_in(root, log)
        stored = _store_wheel(wheel, digest)
        shutil.copy2(stored, root / "tmp" / stored.name)
        sh(
            root,
            f"sh /tmp/install-agent.sh install /tmp/{stored.name}",
            "install-agent.sh install",
            log=log,
            timeout=5400,
        )
        (tmp / "upper" / "etc" / "fedcmd-hil-source").write_text(digest + "\n")
        sh(root, "apt-get clean; rm -rf /var/lib/apt/lists/* /tmp/* /root/.cache", "cleanup", log=log)


def agent_layer() -> Path:
    require()
    base_layer()
    return _layer("agent", agent_hash(), _build_agent)


def layers() -> list[Path]:
    """The lower folders of a session view, top first (agent upper, base rootfs)."""
    agent = agent_layer()
    return [agent / "upper", base_layer() / "rootfs"]


def cached_wheel(digest: str | None = None) -> Path | None:
    folder = cache_dir() / "wheels" / (digest or source_hash())
    found = sorted(folder.glob("fedcmd-*.whl")) if folder.is_dir() else []
    return found[0] if found else None


def wheel(log: Path | None = None) -> Path:
    """The aarch64 wheel of the current source, built inside the rootfs unless cached."""
    digest = source_hash()
    hit = cached_wheel(digest)
    if hit is not None:
        return hit
    lowers = layers()
    with _lock():
        hit = cached_wheel(digest)
        if hit is not None:
            return hit
        scratch = Path(tempfile.mkdtemp(prefix="fedcmd-arm-wheel-"))
        log = log or scratch / "wheel.log"
        try:
            t0 = time.monotonic()
            with view(lowers, scratch / "upper", scratch) as root:
                built = _build_wheel_in(root, log)
                stored = _store_wheel(built, digest)
            _log(f"aarch64 wheel built in {time.monotonic() - t0:.0f} s: {stored.name}")
            return stored
        finally:
            if log.parent == scratch and log.exists():
                shutil.copy2(log, cache_dir() / "last-wheel.log")
            shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------------------------------ sessions
class SessionRoot:
    """An overlay of the cached layers with a private upper folder, mounted until :meth:`close`; the current
    source's wheel installed in its /opt/fedcmd (the layer may hold an older one)."""

    def __init__(self, workdir: Path, lowers: Sequence[Path] | None = None, install_current: bool = True) -> None:
        self.workdir = workdir
        self.lowers = list(lowers) if lowers is not None else layers()
        self.points = mount_view(workdir / "merged", self.lowers, workdir / "upper")
        self.root = self.points[0]
        self.log = workdir / "session.log"
        try:
            _copy_host_network_files(self.root)
            if install_current:
                self.install_current()
        except BaseException:
            self.close()
            raise

    def install_current(self) -> None:
        digest = source_hash()
        marker = self.root / "etc" / "fedcmd-hil-source"
        if marker.exists() and marker.read_text().strip() == digest:
            return
        whl = wheel()
        shutil.copy2(whl, self.root / "tmp" / whl.name)
        sh(
            self.root,
            f"{AGENT_PREFIX}/bin/pip install -q --no-deps --force-reinstall /tmp/{whl.name}",
            "installing the current aarch64 wheel",
            log=self.log,
        )
        marker.write_text(digest + "\n")

    def argv(self, argv: Sequence[str], user: str | None = None, env: dict[str, str] | None = None) -> list[str]:
        return chroot_argv(self.root, argv, user, env)

    def run(
        self, argv: Sequence[str], timeout: float = 600, user: str | None = None, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.argv(argv, user), input=input, capture_output=True, timeout=timeout)

    def path(self, inner: str) -> Path:
        """This machine's path of ``inner`` (an absolute path inside the rootfs)."""
        return self.root / inner.lstrip("/")

    def close(self) -> None:
        if self.points:
            unmount_all(self.points)
            self.points = []


def remove_leftover_sessions(base: Path) -> None:
    """Unmount views left mounted by killed sessions under ``base`` (pytest's temp folders)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1]
        if point.startswith(f"{base}/") and "/merged" in point:
            _umount(Path(point))


# ------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="arm_rootfs.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="say whether this machine can run the emulated aarch64 device")
    sub.add_parser("build", help="build (or reuse) the cached rootfs layers")
    w = sub.add_parser("wheel", help="the aarch64 wheel of the current source, copied into --out")
    w.add_argument("--out", type=Path, required=True)
    sub.add_parser("path", help="print the cache folder")
    args = p.parse_args(argv)
    try:
        if args.cmd == "check":
            reason = why_unavailable()
            print(reason or "ok")
            return 1 if reason else 0
        if args.cmd == "path":
            print(cache_dir())
            return 0
        if args.cmd == "build":
            for layer in layers():
                print(layer)
            return 0
        if args.cmd == "wheel":
            whl = wheel()
            args.out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(whl, args.out / whl.name)
            print(args.out / whl.name)
            return 0
    except ArmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (a half-built layer is rebuilt next time)", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
