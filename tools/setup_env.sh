#!/usr/bin/env bash
# Set-up on a fresh machine: the README's two commands start with this.
#   tools/setup_env.sh          runtime dependencies + the package (editable)
#   tools/setup_env.sh --test   the same plus the test dependencies
# torch: a machine without torch gets the CPU build torch==2.13.0; an existing torch (a GPU
# cluster's CUDA build) is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".${extra}"
# pyenv installs console scripts (deepspeed) behind shims that need a rehash
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
