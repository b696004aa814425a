#!/usr/bin/env bash
# Set-up on a fresh machine: the README's two commands start with this.
#   tools/setup_env.sh          runtime dependencies + the package (editable)
#   tools/setup_env.sh --test   the same plus the test dependencies, and (as root, with apt-get)
#                               the Slurm packages tests/e2e/test_slurm.py stands a local cluster up with
# Versions: every install goes through constraints.txt, the exact versions the suite last passed with
# (refresh it with tools/lock_deps.sh). setup.py keeps the loose ranges for `pip install` elsewhere.
# torch: a machine without torch gets the locked CPU build; an existing torch (a GPU cluster's CUDA
# build) is kept as it is, and so is the triton that came with it: both are pinned to what is
# installed, in place of the lock's lines for them, so no other package can replace them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
cons=$(mktemp --suffix=.txt)
trap 'rm -f "$cons"' EXIT
if "$PY" -c "import torch" >/dev/null 2>&1; then
  grep -vE '^(torch|triton|nvidia-[A-Za-z0-9_.-]+)==' constraints.txt > "$cons"
  "$PY" tools/installed_pins.py torch triton >> "$cons"
else
  cp constraints.txt "$cons"
  "$PY" -m pip install --quiet -c "$cons" torch
fi
"$PY" -m pip install --quiet -c "$cons" -e ".${extra}"
# pyenv installs console scripts (deepspeed) behind shims that need a rehash
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
# tests/e2e/test_slurm.py runs the launch/slurm/ templates on a local Slurm, and tests/e2e/test_demo.py drives the
# demo page with Playwright in Debian's headless chromium: install them where we can (Debian/Ubuntu, as
# root). Best effort: if apt fails, the setup goes on and those tests report why.
apt_for_tests() {   # $1: a command that is there when the packages are; the rest: the packages
  local probe=$1; shift
  if [ -n "$extra" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
     && ! PATH="$PATH:/usr/sbin:/sbin" command -v "$probe" >/dev/null 2>&1; then
    echo "setup_env: installing $* (for the tests)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"; } \
      >/dev/null 2>&1 || echo "setup_env: could not install $*; the tests that need them will say why" >&2
  fi
}
apt_for_tests slurmctld slurmctld slurmd slurm-client munge
apt_for_tests chromium chromium
