"""The repository's style is the one `ruff.toml` sets: every Python file formatted by `ruff format`, and
`ruff check` (import order, unused and undefined names, line length) clean. pre-commit runs the same two
at each commit; this test keeps a commit made without it from landing."""

import shutil
import subprocess

import pytest

from tests.helpers import ROOT


def _ruff(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff") or pytest.fail("ruff is not installed: tools/setup_env.sh --test installs it")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_every_python_file_is_formatted_and_lint_clean():
    """Mutations caught (checked): a line of `sclslt/atomic.py` indented by 2 more spaces inside its
    parentheses (format), an unused `import os` added to a module (check)."""
    fmt = _ruff("format", "--check", "--diff", ".")
    assert fmt.returncode == 0, "ruff format would change these files (run `ruff format .`):\n" + fmt.stdout[-4000:]
    lint = _ruff("check", "--output-format", "concise", ".")
    assert lint.returncode == 0, "ruff check (run `ruff check --fix .`):\n" + lint.stdout[-4000:]


def test_the_check_fails_on_a_file_it_should_refuse(tmp_path):
    """The settings are read and applied: a copy of ruff.toml next to a badly formatted file with an unused
    import fails both commands (a ruff.toml that excluded everything would pass the test above)."""
    shutil.copy(ROOT / "ruff.toml", tmp_path / "ruff.toml")
    (tmp_path / "bad.py").write_text("import os\nx = ( 1,2 )\n")
    assert _ruff("format", "--check", ".", cwd=tmp_path).returncode == 1
    lint = _ruff("check", "--output-format", "concise", ".", cwd=tmp_path)
    assert lint.returncode == 1 and "F401" in lint.stdout, lint.stdout
