import pytest
import yaml

from sclslt.config import Config, ConfigError, from_dict, load_config, parse_overrides, save_config, to_dict
from tests.helpers import ROOT


def test_defaults_validate_and_stage_defaults_differ():
    cfg = Config().validate()
    assert cfg.stage1.contrastive_weight > 0 and cfg.stage2.contrastive_weight == 0


def test_file_then_dotted_overrides(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text(yaml.safe_dump({"train": {"max_steps": 7, "seed": 3}, "stage2": {"lr": 0.5}}))
    cfg = load_config(f, ["--train.max_steps", "50", "--model.backbone_hidden=[4, 8]", "--stage1.enabled", "false"])
    assert cfg.train.max_steps == 50 and cfg.train.seed == 3
    assert cfg.stage2.lr == 0.5 and cfg.stage2.contrastive_weight == 0.0  # stage default kept under a partial section
    assert cfg.model.backbone_hidden == [4, 8] and cfg.stage1.enabled is False


@pytest.mark.parametrize("where", ["file", "cli"])
def test_unknown_key_is_an_error_naming_it(tmp_path, where):
    f = tmp_path / "exp.yaml"
    f.write_text(yaml.safe_dump({"train": {"max_stpes": 1}} if where == "file" else {}))
    ov = ["--data.synthetic.n_trian", "3"] if where == "cli" else []
    with pytest.raises(ConfigError, match="n_trian" if where == "cli" else "train.max_stpes"):
        load_config(f, ov)


def test_type_errors_name_the_key():
    with pytest.raises(ConfigError, match="train.max_steps"):
        from_dict({"train": {"max_steps": "many"}})
    with pytest.raises(ConfigError, match="stage1.enabled"):
        from_dict({"stage1": {"enabled": "maybe"}})
    with pytest.raises(ConfigError, match="model.similarity"):
        from_dict({"model": {"similarity": "cosine"}})


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="dotted"):
        parse_overrides(["--max_steps", "3"])
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--train.seed"])


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["--train.seed", "11", "--eval.beam", "3"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)


def test_base_files_chain_and_are_overridden(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {d_model: 48, heads: 4}\nstage1: {epochs: 3}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nmodel: {heads: 2}\n")
    (tmp_path / "c.yaml").write_text("base: sub/b.yaml\nstage1: {epochs: 7}\n")
    cfg = load_config(tmp_path / "c.yaml", ["--model.d_model", "64"])
    assert (cfg.model.d_model, cfg.model.heads, cfg.stage1.epochs) == (64, 2, 7)
    (tmp_path / "loop.yaml").write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(tmp_path / "orphan.yaml")


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")))
def test_every_shipped_experiment_file_loads(path):
    cfg = load_config(ROOT / path)
    if (
        "phoenix2014t" in path or "csl_daily" in path
    ):  # the paper's recipe (docs/paper.md "Symmetric InfoNCE and the model")
        assert (cfg.model.lora_rank, cfg.model.lora_alpha, cfg.eval.beam) == (16, 32, 8)
        assert cfg.stage1.label_smoothing == cfg.stage2.label_smoothing == 0.2
        assert cfg.model.similarity == "cico" and cfg.stage1.freeze_text_encoder
        assert cfg.eval.bleu_tokenize == ("zh" if "csl_daily" in path else "13a")


def test_train_help_lists_every_config_field_with_its_comment(capsys):
    """`sclslt train --help` (and launch/train.py --help) name every field; commented fields carry the comment."""
    import dataclasses

    import pytest as _pytest

    from sclslt.cli import main
    from sclslt.config import Config

    with _pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out

    def paths(obj, prefix=""):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            yield from paths(v, f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else [f"{prefix}{f.name}"]

    every = list(paths(Config()))
    assert len(every) > 50 and all(f"--{p} (default" in out for p in every)
    assert "--train.max_steps (default 0): cap on optimizer steps per stage" in out


def test_sclslt_train_reports_a_config_error_with_exit_code_2(tmp_path, capsys):
    from sclslt.cli import main

    assert main(["train", "--train.max_stpes", "5", "--train.run_dir", str(tmp_path / "r")]) == 2
    assert "train.max_stpes" in capsys.readouterr().err


def test_every_name_field_refuses_an_unknown_name_and_help_lists_the_names():
    """Names live once: a registry of implementations or the field's Literal type; the check
    and --help read them from there."""
    from sclslt.config import Config, field_help, name_fields
    from sclslt.registry import REGISTRIES

    fields = name_fields(Config())
    assert set(REGISTRIES) <= set(fields) and {"data.decode", "selection.mode", "train.precision"} <= set(fields)
    help_lines = field_help()
    for key, names in fields.items():
        section, name = key.split(".")
        default = getattr(getattr(Config(), section), name)
        assert set(default if isinstance(default, list) else [default]) <= set(names), key  # defaults are names
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            from_dict({section: {name: ["no-such-name"] if isinstance(default, list) else "no-such-name"}})
        line = next(ln for ln in help_lines if ln.startswith(f"  --{key} "))
        assert f"one of {', '.join(names)}" in line, line
    assert from_dict({"selection": {"schedule": "sqrt"}}).selection.schedule == "sqrt"


def test_help_prints_every_line_of_a_fields_comment():
    """A field's comment continued on the lines below it is printed whole, and nothing else joins it. Mutation
    caught (checked): only the first comment line read (the help stops at "each pool on")."""
    import inspect
    import re

    from sclslt.config import SelectionConfig, field_help

    src = inspect.getsource(SelectionConfig)
    first, more = re.search(r"\n    pools: int = \d+ +# (.*)\n +# (.*)\n", src).groups()
    line = next(ln for ln in field_help() if ln.startswith("  --selection.pools "))
    assert line.endswith(f": {first} {more}"), line
    chunk = next(ln for ln in field_help() if ln.startswith("  --selection.chunk "))
    assert more not in chunk and "never the GPU count" not in chunk
