"""The README's two commands must stay what `.ci/run` and the launcher actually do."""

import re
import shlex
from pathlib import Path

from tests.helpers import ROOT


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_shows_main_job_and_test_command():
    main, tests = readme_commands()[:2]
    assert main == "tools/setup_env.sh && deepspeed launch/train.py --deepspeed configs/zero2.json"
    assert tests.startswith("tools/setup_env.sh --test && ")


def test_ci_runs_the_readme_test_command():
    tests = readme_commands()[1]
    ci = [
        ln.strip()
        for ln in (ROOT / ".ci" / "run").read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    assert tests in ci, f".ci/run does not run the README's test command {tests!r}"


def test_main_job_arguments_parse_to_the_default_run():
    """launch/train.py is `sclslt.train.main` run from a checkout (its imports say so), so the README's main job
    parses with that module's parser. Mutation caught: a default DeepSpeed config other than configs/zero2.json."""
    import ast

    import sclslt.train.main as launcher

    tree = ast.parse((ROOT / "launch" / "train.py").read_text())
    assert any(isinstance(n, ast.ImportFrom) and n.module == "sclslt.train.main" for n in ast.walk(tree))
    main = readme_commands()[0].split("&&")[1]
    argv = shlex.split(main)
    assert argv[:2] == ["deepspeed", "launch/train.py"]
    # the deepspeed launcher appends --local_rank; everything else is ours
    args, rest = launcher.parse_args(argv[2:] + ["--local_rank=0"])
    assert rest == [] and args.config is None and not args.resume
    assert (ROOT / args.ds_config).is_file()
    assert Path(args.ds_config).resolve() == Path(launcher.DEFAULT_DS).resolve()


def test_setup_script_and_ds_configs_exist():
    setup = ROOT / "tools" / "setup_env.sh"
    assert setup.is_file() and setup.stat().st_mode & 0o111
    import json

    for z in (1, 2, 3):
        ds = json.loads((ROOT / "configs" / f"zero{z}.json").read_text())
        assert ds["zero_optimization"]["stage"] == z
        assert not {"train_batch_size", "train_micro_batch_size_per_gpu"} & set(ds)


def test_every_experiment_file_loads():
    from sclslt.config import load_config

    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files
    for f in files:
        load_config(f)


def test_deepspeed_configs_are_named_by_stage_or_path(capsys):
    """`--deepspeed zero3` names the packaged file (what the checkout's configs/zero3.json links to), a path is
    taken as it is, an unknown name is a usage error listing the packaged ones. Mutation caught (checked): names
    not resolved (`zero3` taken as a path: a usage error)."""
    import pytest

    import sclslt.train.main as launcher

    args, _ = launcher.parse_args(["--deepspeed", "zero3"])
    assert Path(args.ds_config).read_text() == (ROOT / "configs" / "zero3.json").read_text()
    assert Path(args.ds_config).is_relative_to(ROOT / "sclslt")  # installed with the package
    args, _ = launcher.parse_args(["--deepspeed", "configs/zero1.json"])
    assert args.ds_config == "configs/zero1.json"
    with pytest.raises(SystemExit):
        launcher.parse_args(["--deepspeed", "zero9"])
    assert (
        "zero9: no such DeepSpeed config file; name a packaged one (zero1, zero2, zero3, zero3_offload)"
        in capsys.readouterr().err
    )
