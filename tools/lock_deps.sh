#!/usr/bin/env bash
# Refresh constraints.txt: resolve setup.py's loose ranges afresh in a new virtual environment (CPU torch
# as tools/setup_env.sh installs it), freeze the result, then run the suite with it before committing.
#   tools/lock_deps.sh [TORCH_VERSION]      (default: the torch the current lock names)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
torch_v=${1:-$(sed -n 's/^torch==//p' constraints.txt)}
venv=$(mktemp -d)/venv
"$PY" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "torch==${torch_v}"
"$venv/bin/python" -m pip install --quiet -e ".[test,mpi]"
{
  sed -n '1,/^[^#]/{/^#/p}' constraints.txt
  "$venv/bin/python" -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+cpu$/\1/'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
rm -rf "$(dirname "$venv")"
echo "constraints.txt refreshed; now: tools/setup_env.sh --test && python -m pytest -q tests"
