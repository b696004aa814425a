"""What the repository itself holds: no large tracked files, and one append-only CSV per benchmark whose every
row says where it came from. Fast (one `git ls-files`, a few CSV reads)."""

import csv
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT

MAX_TRACKED_BYTES = 500 * 1024
BENCHMARK_CSVS = ("planner", "loader", "loader-stream", "kernel-resources", "memory", "chaos")
PROVENANCE = ("time", "device", "commit", "command", "torch")


def oversized_tracked_files(root: Path, limit: int = MAX_TRACKED_BYTES) -> dict[str, int]:
    """Tracked (or staged) files of the git checkout at `root` over `limit` bytes, by path. A tracked file
    deleted from the work tree is skipped (its deletion is what will be committed)."""
    if shutil.which("git") is None:
        pytest.fail("git is not installed: the suite runs in a clone and needs git to list the tracked files")
    proc = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, timeout=60)
    assert proc.returncode == 0, f"git ls-files failed in {root}: {proc.stderr.decode()[-2000:]}"
    sizes = {}
    for name in proc.stdout.decode().split("\0"):
        path = root / name
        if name and path.is_file() and not path.is_symlink():
            sizes[name] = path.stat().st_size
    return {name: size for name, size in sizes.items() if size > limit}


def test_no_tracked_file_is_over_500_kb():
    """Every tracked file is at most 500 KB (large data, checkpoints and run outputs stay out of git; a test
    fixture is made small). Mutation caught: a 600 KB file added and staged makes it fail (checked by
    `test_the_size_check_sees_a_staged_600_kb_file` on a scratch repository, and by hand with the 738 KB
    optimizer state that tests/fixtures/run_before_layout_move held before it was regenerated smaller)."""
    big = oversized_tracked_files(ROOT)
    assert not big, "tracked files over 500 KB (keep them out of git, or make them smaller): " + ", ".join(
        f"{name} ({size // 1024} KB)" for name, size in sorted(big.items())
    )


def test_the_size_check_sees_a_staged_600_kb_file(tmp_path):
    """The check above on a scratch repository: a staged 600 KB file is reported, a 400 KB one and an
    untracked 600 KB one are not."""
    if shutil.which("git") is None:
        pytest.fail("git is not installed: the suite runs in a clone and needs git")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True, timeout=60)
    (tmp_path / "big.bin").write_bytes(b"\0" * 600 * 1024)
    (tmp_path / "small.bin").write_bytes(b"\0" * 400 * 1024)
    (tmp_path / "untracked.bin").write_bytes(b"\0" * 600 * 1024)
    subprocess.run(["git", "-C", str(tmp_path), "add", "big.bin", "small.bin"], check=True, timeout=60)
    assert oversized_tracked_files(tmp_path) == {"big.bin": 600 * 1024}


@pytest.mark.parametrize("bench", BENCHMARK_CSVS)
def test_every_benchmark_row_says_where_it_came_from(bench):
    """benchmarks/results/<benchmark>.csv (benchio.write_rows appends every run there): every row has its
    time, device, commit, command and torch version columns, and time, device and torch filled (commit and
    command are "" only for runs folded in from per-run files whose command no doc recorded). Mutation
    caught: write_rows no longer flattening `versions` (no torch column), or a per-run file's rows folded
    in without their tag."""
    path = ROOT / "benchmarks" / "results" / f"{bench}.csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in PROVENANCE if c not in (reader.fieldnames or [])]
        assert not missing, f"{path.name} has no {missing} column"
        rows = list(reader)
    assert rows, f"{path.name} has no rows"
    for i, r in enumerate(rows, start=2):
        assert None not in r and all(r[c] is not None for c in PROVENANCE), f"{path.name} line {i} is short"
        assert r["time"] and r["device"] and r["torch"], f"{path.name} line {i} lacks its time/device/torch"
    times = [r["time"] for r in rows]
    assert times == sorted(times), f"{path.name}: rows are not in time order"
