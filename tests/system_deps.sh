#!/usr/bin/env bash
# The system packages the test suite needs beyond the venv: the real MQTT broker (mosquitto + its clients) and
# Debian's chromium with its driver (the dashboard's real-browser tests). Installed with apt-get where this
# process may (root, apt present); otherwise the tests that need them skip with the reason, and this says so.
#   tests/system_deps.sh           best effort (make test)
#   tests/system_deps.sh --strict  exit 1 when something is still missing afterwards (.ci/run)
set -uo pipefail
strict=0
[ "${1:-}" = "--strict" ] && strict=1

have_broker() {
  { command -v mosquitto || test -x /usr/sbin/mosquitto; } >/dev/null 2>&1 \
    && command -v mosquitto_pub >/dev/null 2>&1 && command -v mosquitto_sub >/dev/null 2>&1
}
have_browser() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }

apt_install() {  # an out-of-date package index is the usual failure on a fresh machine: update once, retry
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
  echo "tests/system_deps.sh: apt-get install $*" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1; }
}

missing=0
# ensure CHECK WHAT-SKIPS PACKAGE...: install the packages when CHECK fails; still failing, say which tests skip
ensure() {
  local check=$1 skips=$2
  shift 2
  "$check" && return
  apt_install "$@"
  "$check" && return
  missing=1
  echo "tests/system_deps.sh: $* not installed (not root, or apt-get failed): $skips will skip" >&2
}
ensure have_broker "the MQTT tests (memory vs MQTT, SIGKILL resume, ACL/TLS, cloud status)" mosquitto mosquitto-clients
ensure have_browser "the dashboard's real-browser tests" chromium chromium-driver
[ "$strict" = 1 ] && [ "$missing" = 1 ] && exit 1
exit 0
