#!/usr/bin/env bash
# The newest-versions lane (run by .ci/run after the locked suite): the next upstream release that breaks
# the trainer shows up here before a user installs it. It makes a virtual environment over this one
# (--system-site-packages, so only what differs is installed), upgrades every dependency to the newest
# release setup.py's ranges allow (pip's eager strategy) except torch and triton, kept as installed (as
# tools/setup_env.sh keeps a cluster's CUDA build), prints what differs from constraints.txt, and runs a representative part of the suite there: the fast
# lane, the main job and its export (tests/e2e/test_export.py), a 2-rank DeepSpeed run, and the checks that
# no installed package is shadowed by a checkout (tests/unit/project/test_import_paths.py).
#   tools/newest_lane.sh            warn: a failure is reported (what broke, which versions) but exits 0
#   tools/newest_lane.sh --strict   exit with pytest's status
# When it passes, refresh the lock (tools/lock_deps.sh) and run the suite with it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
strict=0
[ "${1:-}" = "--strict" ] && strict=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
venv=$tmp/venv
say() { echo "newest-lane: $*"; }
"$PY" -m venv --system-site-packages "$venv"
"$PY" tools/installed_pins.py torch triton >"$tmp/keep.txt"
if ! "$venv/bin/python" -m pip install --quiet --upgrade --upgrade-strategy eager -c "$tmp/keep.txt" -e ".[test]" \
      >"$tmp/pip.log" 2>&1; then
  tail -20 "$tmp/pip.log"
  say "WARNING: the newest versions setup.py allows do not install together (above)"
  exit $((strict ? 1 : 0))
fi
# the tests launch `deepspeed` beside their interpreter: a launcher that runs this environment's python
# (deepspeed itself is pinned, so it came from the system site, console script and all)
printf '#!/bin/sh\nexec "%s" -m deepspeed.launcher.runner "$@"\n' "$venv/bin/python" >"$venv/bin/deepspeed"
chmod +x "$venv/bin/deepspeed"
export PATH="$venv/bin:$PATH"
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$venv/bin/python" -m pip freeze --exclude-editable --path "$site" 2>/dev/null | sort >"$tmp/newest.txt"
grep -E '^[A-Za-z0-9_.-]+==' constraints.txt | sort >"$tmp/locked.txt"
newer=$(comm -13 "$tmp/locked.txt" "$tmp/newest.txt" | tr '\n' ' ')
say "versions other than the lock's: ${newer:-none}"
tests=(tests/unit/project/test_import_paths.py tests/e2e/test_export.py
       "tests/e2e/test_distributed.py::test_two_ranks_equal_one_process_and_resume_reproduces")
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/unit >"$tmp/fast.log" 2>&1
fast=$?
"$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}" >"$tmp/e2e.log" 2>&1
e2e=$?
if [ $fast -eq 0 ] && [ $e2e -eq 0 ]; then
  say "passed with the newest versions (fast lane: $(tail -1 "$tmp/fast.log"); end to end: $(tail -1 "$tmp/e2e.log"))"
  exit 0
fi
for log in fast e2e; do
  grep -E '^(FAILED|ERROR) ' "$tmp/$log.log" | sed 's/^/newest-lane:   /'
done
tail -n 60 "$tmp/fast.log" "$tmp/e2e.log"
say "WARNING: the suite FAILS with the newest versions setup.py allows (${newer:-none}): pin the package that"
say "broke it below the failing release in setup.py, or fix the code, before users install it"
exit $((strict ? (fast ? fast : e2e) : 0))
