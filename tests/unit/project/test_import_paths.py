"""A checkout never shadows an installed package, and a checkout's code is one commit's code.

Our top-level `kernels/` installs as `sclslt_kernels`; transformers >= 5.25 imports Hugging Face's `kernels`.
Every entry point puts a checkout's root first on sys.path (`python -m pytest`, `python -c` in the checkout,
launch/train.py, the tools), so without care `import kernels` found our folder and transformers died at import.
Each test runs a fresh interpreter the way users do, with a stand-in `kernels` package installed after the
checkout on the path (as site-packages is), and Hugging Face's own where the environment has it.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT


@pytest.fixture
def standin(tmp_path) -> Path | None:
    """A package named `kernels` (not ours) on a path entry after the checkout's; None where Hugging Face's is
    installed (transformers then imports names from it that a stand-in lacks: the real one is the test)."""
    try:
        importlib.metadata.version("kernels")
        return None
    except importlib.metadata.PackageNotFoundError:
        pass
    pkg = tmp_path / "site" / "kernels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('MARK = "stand-in"\n')
    (pkg / "sub.py").write_text('WHO = "stand-in"\n')
    return pkg.parent


def installed_kernels(standin: Path | None) -> str:
    """Where `import kernels` must lead: the stand-in's folder, or Hugging Face's package."""
    if standin is not None:
        return str(standin / "kernels")
    init = [f for f in importlib.metadata.files("kernels") if str(f).replace("\\", "/") == "kernels/__init__.py"]
    return str(Path(init[0].locate()).resolve().parent)


def python(code: str, cwd: Path, site: Path | None = None, *argv: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    p = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout.strip().splitlines()[-1]


def test_in_a_checkout_kernels_is_the_installed_one_and_the_trainer_imports(standin):
    """From the checkout's root (cwd first on sys.path, and the root inserted as launch/train.py does),
    `kernels` and its submodules are the installed package's, while `sclslt_kernels` is ours and the trainer's
    import path (transformers included) loads.
    Mutation caught: deleting the step-aside branch of kernels/__init__.py (kernels is then our folder)."""
    out = python(
        "import os, sys; sys.path.insert(0, sys.argv[1]);"
        "import sclslt.train.main, transformers.activations, sclslt_kernels, kernels;"
        "print(os.path.dirname(os.path.realpath(kernels.__file__)), sclslt_kernels.__file__, "
        "sclslt_kernels.infonce.__name__)",
        ROOT,
        standin,
        str(ROOT),
    )
    assert out.split() == [installed_kernels(standin), str(ROOT / "kernels" / "__init__.py"), "infonce"]


def test_without_an_installed_kernels_the_folder_is_still_not_kernels():
    """Where no `kernels` is installed, `import kernels` from the checkout gives no module of ours: none with a
    file (transformers' availability check reads that as "not installed", and must not crash), and no way to
    reach our modules under that name.
    Mutation caught: the fallback re-executing our package as `kernels` (kernels.infonce importable)."""
    try:
        importlib.metadata.version("kernels")
        pytest.skip("Hugging Face's kernels is installed here: the stand-in test above covers this checkout")
    except importlib.metadata.PackageNotFoundError:
        pass
    out = python(
        "import importlib.util, kernels\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "try:\n    import kernels.infonce; sub = 'ours'\nexcept ImportError:\n    sub = 'none'\n"
        "print(getattr(kernels, '__file__', None), is_kernels_available(), sub)",
        ROOT,
    )
    assert out == "None False none"


def test_hugging_face_kernels_with_transformers_from_the_checkout():
    """With Hugging Face's `kernels` installed (transformers >= 5.25 requires it), transformers' hub kernels
    integration imports from the checkout: the import that failed in the issue's trace.
    Mutation caught: deleting the step-aside branch of kernels/__init__.py (checked: ImportError of CUDAProperties)."""
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed here (transformers < 5.25)")
    out = python("import transformers.integrations.hub_kernels, kernels; print(kernels.__file__)", ROOT)
    assert not Path(out).resolve().is_relative_to(ROOT), out


def test_a_worktree_runs_its_own_sclslt_and_kernels_beside_the_installed_package(tmp_path, standin):
    """A copy of the checkout (as `git worktree add` makes for an older commit) run by its own script: both
    `sclslt` and `sclslt_kernels` are the copy's (one commit's code), `kernels` stays the installed one, and a
    tool starts.
    Mutation caught: dropping `_bind_checkout_kernels` from sclslt/__init__.py (sclslt_kernels then comes from
    the installed checkout while sclslt comes from the worktree)."""
    tree = tmp_path / "worktree"
    tree.mkdir()
    for part in ("sclslt", "kernels", "launch", "tools", "configs"):
        shutil.copytree(ROOT / part, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.py", tree / "setup.py")
    out = python(
        "import runpy, sys; sys.argv = ['launch/train.py', '--help'];\n"
        "try:\n    runpy.run_path('launch/train.py', run_name='not_main')\nexcept SystemExit:\n    pass\n"
        "import os, sclslt, sclslt_kernels, kernels; from sclslt.model import heads\n"
        "print(sclslt.__file__, sclslt_kernels.__file__, sys.modules[heads.infonce.__module__].__file__, "
        "os.path.dirname(os.path.realpath(kernels.__file__)))",
        tree,
        standin,
    )
    assert out.split() == [
        str(tree / "sclslt" / "__init__.py"),
        str(tree / "kernels" / "__init__.py"),
        str(tree / "kernels" / "infonce.py"),
        installed_kernels(standin),
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    help_text = subprocess.run(
        [sys.executable, "tools/shard_videos.py", "--help"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, **({"PYTHONPATH": str(standin)} if standin else {})},
    )
    assert help_text.returncode == 0 and "usage" in help_text.stdout.lower(), help_text.stderr[-2000:]


def test_the_wheel_carries_the_deepspeed_configs_and_every_command(tmp_path):
    """What `pip install .` installs: the packaged DeepSpeed configs (`--deepspeed zero2` must work without a
    checkout), the modules of every `sclslt` command, and none of tools/. Mutation caught (checked): setup.py's
    package_data removed (no configs in the wheel)."""
    import zipfile

    src = tmp_path / "src"  # a clean copy: a checkout's stale build/ would fill the wheel
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "results"))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    names = set(zipfile.ZipFile(next(tmp_path.glob("sclslt-*.whl"))).namelist())
    assert {f"sclslt/configs/zero{z}.json" for z in ("1", "2", "3", "3_offload")} <= names
    assert {
        "sclslt/data/sharding.py",
        "sclslt/selection/reference.py",
        "sclslt/eval/offline.py",
        "sclslt/eval/export.py",
        "sclslt/cli.py",
        "sclslt_kernels/infonce.py",
    } <= names
    assert not any(n.startswith(("tools/", "tests/", "launch/")) for n in names)
