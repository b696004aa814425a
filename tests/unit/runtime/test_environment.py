"""What a run takes from the machine it runs on: DeepSpeed's JIT-built ops live in a directory of this Python
environment's own (two environments of one Python shared torch's default, and a killed build's stale lock in one
stalled every launch of the other)."""

import os

from sclslt.runtime.distributed import extensions_dir, setup_accelerator


def test_each_environment_builds_its_ops_in_its_own_directory(tmp_path, monkeypatch):
    """Mutation caught: one directory for every environment (the prefix ignored; checked)."""
    a, b = tmp_path / "venv-a", tmp_path / "venv-b"
    a.mkdir()
    b.mkdir()
    (tmp_path / "link").symlink_to(a)
    assert extensions_dir(str(a)) != extensions_dir(str(b))
    assert extensions_dir(str(tmp_path / "link")) == extensions_dir(str(a))  # the same environment
    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    setup_accelerator()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == extensions_dir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))  # a user's choice stands
    setup_accelerator()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")
