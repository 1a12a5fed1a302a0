#!/bin/sh
# Install the fedcmd edge agent on a Raspberry Pi (Raspberry Pi OS Lite 64-bit = Debian bookworm arm64),
# as root. deploy/README.md ("A Raspberry Pi from scratch") is the guide; the hardware-in-the-loop suite's
# emulated Pi (tests/hil/arm_rootfs.py) runs this same file inside its aarch64 rootfs, so the guide's
# commands are the tested ones.
#
#   install-agent.sh system                       apt packages (python3-venv, python3-dev, g++, cmake) + user fedcmd
#   install-agent.sh install  WHEEL|SOURCE_DIR    venv $FEDCMD_PREFIX (/opt/fedcmd): torch pins + fedcmd[full]
#   install-agent.sh infer    WHEEL|SOURCE_DIR    venv with fedcmd[edge-infer] only (no torch: predict only)
#   install-agent.sh all      WHEEL|SOURCE_DIR    system, then install
#   install-agent.sh provision PARTITION PASSWORD [CA]
#                                                 the device's files where the unit expects them: /etc/fedcmd
#                                                 (root:fedcmd 0640), /var/lib/fedcmd/partition.npz, the state dir
#
# A WHEEL is what `make wheels` puts in dist/ (fedcmd-*-linux_aarch64.whl); a SOURCE_DIR (a checkout)
# compiles the native kernels on the board (~3 min on a Pi 4; NumPy kernels if headers are missing).
set -eu

PREFIX=${FEDCMD_PREFIX:-/opt/fedcmd}
# The Makefile's TORCH_PINS for aarch64 (DESIGN.md §6); tests/hil/test_arm.py checks they are the same.
TORCH_PINS_AARCH64="torch==2.9.1 torchvision==0.24.1"
TORCH_PINS_X86_64="torch==2.14.1 torchvision==0.29.1"

die() { echo "error: $*" >&2; exit 2; }

system() {
  [ "$(id -u)" = 0 ] || die "run as root (sudo $0 system)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends python3-venv python3-dev g++ cmake make ca-certificates
  id fedcmd >/dev/null 2>&1 || useradd --system --user-group --home-dir /var/lib/fedcmd --no-create-home \
    --shell /usr/sbin/nologin fedcmd
  install -d -o fedcmd -g fedcmd -m 0750 /var/lib/fedcmd
}

pins() {
  case "$(uname -m)" in
    aarch64) echo "$TORCH_PINS_AARCH64" ;;
    x86_64) echo "$TORCH_PINS_X86_64" ;;
    *) die "no torch pins for $(uname -m): fedcmd's training agent runs on aarch64 and x86_64" ;;
  esac
}

check_target() {
  [ -n "${1:-}" ] || die "name a wheel (dist/fedcmd-*.whl) or a fedcmd checkout"
  [ -e "$1" ] || die "$1 does not exist"
  case "$1" in
    *.whl)
      # a wheel for another CPU: say so here instead of pip's "is not a supported wheel on this platform"
      tag=${1##*-}; tag=${tag%.whl}
      case "$tag" in any|*"$(uname -m)"*) ;; *) die "$1 is a $tag wheel; this machine is $(uname -m)" ;; esac ;;
    *) [ -f "$1/pyproject.toml" ] || die "$1 is neither a .whl nor a fedcmd checkout (no pyproject.toml)" ;;
  esac
}

venv() {
  command -v python3 >/dev/null || die "python3 is not installed (apt-get install python3-venv)"
  [ -x "$PREFIX/bin/pip" ] || python3 -m venv "$PREFIX" || die "python3 -m venv $PREFIX failed (apt-get install python3-venv)"
}

install_full() {
  check_target "${1:-}"
  venv
  torch_pins=$(pins)
  # shellcheck disable=SC2086  # the pins are two words on purpose
  "$PREFIX/bin/pip" install -q $torch_pins
  # shellcheck disable=SC2086
  "$PREFIX/bin/pip" install -q $torch_pins "$1[full]"
  report
}

install_infer() {
  check_target "${1:-}"
  venv
  "$PREFIX/bin/pip" install -q "$1[edge-infer]"
  report
}

report() {
  "$PREFIX/bin/fedcmd-edge" --help >/dev/null
  "$PREFIX/bin/python" -c 'import platform, fedcmd_core.kernels as k; print(f"fedcmd installed in '"$PREFIX"' ({platform.machine()}), kernels: {k.backend()}")'
}

provision() {
  [ "$(id -u)" = 0 ] || die "run as root (sudo $0 provision ...)"
  [ -f "${1:-}" ] || die "provision: the partition file ${1:-(none given)} does not exist"
  [ -f "${2:-}" ] || die "provision: the password file ${2:-(none given)} does not exist"
  id fedcmd >/dev/null 2>&1 || die "no user fedcmd: run $0 system first"
  install -d -o root -g fedcmd -m 0750 /etc/fedcmd
  install -o root -g fedcmd -m 0640 "$2" /etc/fedcmd/password
  if [ -n "${3:-}" ]; then install -o root -g fedcmd -m 0640 "$3" /etc/fedcmd/ca.crt; fi
  install -d -o fedcmd -g fedcmd -m 0750 /var/lib/fedcmd /var/lib/fedcmd/state
  install -o root -g fedcmd -m 0640 "$1" /var/lib/fedcmd/partition.npz
}

case "${1:-}" in
  system) system ;;
  install) install_full "${2:-}" ;;
  infer) install_infer "${2:-}" ;;
  all) system; install_full "${2:-}" ;;
  provision) provision "${2:-}" "${3:-}" "${4:-}" ;;
  *) die "usage: $0 system | install WHEEL|SOURCE_DIR | infer WHEEL|SOURCE_DIR | all WHEEL|SOURCE_DIR | provision PARTITION PASSWORD [CA]" ;;
esac
