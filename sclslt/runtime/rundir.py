"""A run directory: every path in it, and reading a run back (config, tokenizer, checkpoints, the one
the run selected, the model of a checkpoint), and `RunError`, the error a run stops with (raised here by
an unreadable results file, and by every floor above). The loop writes through these paths; translation,
retrieval, the reference export and the tools read through them.

  config.yaml                    resolved config (also inside every checkpoint)
  tokenizer/                     the tokenizer the run trained or loaded
  <stage>/checkpoints/<tag>      DeepSpeed checkpoints + client state (`checkpoints`, `checkpointer`)
  <stage>/metrics.csv            per-step values (timing.csv, telemetry.csv beside it)
  <stage>/batches.jsonl          the audit trail: each optimizer step's global batch
  <stage>/selection/plan_eNNNN.json   Pair Selection's planned batches of an epoch
  results.json                   metrics, BLEU signature, the trivial baseline, the selected checkpoint
  hypotheses.<split>.jsonl       key, hypothesis, reference
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sclslt.runtime.checkpoints import MODEL_FILES, latest_tag, load_module_state


class RunError(RuntimeError):
    """The run cannot go on; the message says what to do."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def results_file(self) -> Path:
        return self.root / "results.json"

    def hypotheses(self, split: str) -> Path:
        return self.root / f"hypotheses.{split}.jsonl"

    def stage(self, name: str) -> Path:
        return self.root / name

    def checkpoints(self, stage: str) -> Path:
        return self.root / stage / "checkpoints"

    def metrics(self, stage: str) -> Path:
        return self.root / stage / "metrics.csv"

    def batches(self, stage: str) -> Path:
        return self.root / stage / "batches.jsonl"

    def selection(self, stage: str) -> Path:
        return self.root / stage / "selection"

    def tags(self, stage: str) -> list[str]:
        """The stage's published checkpoint tags (directories with a model states file), sorted."""
        return checkpoint_tags(self.checkpoints(stage))

    def latest(self, stage: str) -> str | None:
        return latest_tag(self.checkpoints(stage))

    def selected(self) -> tuple[str, str] | None:
        """(stage, tag) the run selected and evaluated, from results.json (None when not recorded)."""
        f = self.results_file
        if not f.is_file():
            return None
        try:
            sel = json.loads(f.read_text()).get("selected_checkpoint")
        except (json.JSONDecodeError, AttributeError) as e:
            raise RunError(f"{f} is not a valid results file: {e}") from e
        if isinstance(sel, str) and sel:
            return "stage2", sel
        if isinstance(sel, dict) and sel.get("tag"):
            return str(sel.get("stage") or "stage2"), str(sel["tag"])
        return None

    def config(self):
        from sclslt.config import load_config

        return load_config(self.config_file)

    def tokenizer(self):
        from sclslt.data.text import load_tokenizer

        return load_tokenizer(self.tokenizer_dir)


def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if any((p / f).is_file() for f in MODEL_FILES))


def load_run_model(run_dir, ckpt_dir=None, tag: str | None = None):
    """(model, tokenizer, config) of a run, with the weights of checkpoint `tag` of `ckpt_dir` (a
    stage's checkpoints directory, or a stage name; latest if `tag` is None), built from the run's saved
    config and tokenizer."""
    from sclslt.model.slt import SLTModel

    run = RunDir(run_dir)
    if ckpt_dir is None or str(ckpt_dir) in ("stage1", "stage2"):
        ckpt_dir = run.checkpoints(str(ckpt_dir or "stage2"))
    cfg, tok = run.config(), run.tokenizer()
    model = SLTModel(cfg.model, tok, cfg.data)
    state = load_module_state(ckpt_dir, tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {ckpt_dir}/{tag} does not match the run's model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model, tok, cfg
