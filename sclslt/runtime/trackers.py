"""Experiment trackers, chosen per run with `train.report_to` (the name transformers uses): TensorBoard
(`tensorboard`, the default), Weights & Biases (`wandb`) and Trackio (`trackio`, local-first). Rank 0 only
(the `Reporter` owns them). Every tracker gets the same things:

- the resolved config, at the start;
- every scalar TensorBoard gets, under the same names prefixed by the stage (`stage1/train/loss`,
  `stage1/time/step_ms`, `stage2/dev/bleu4`, `stage1/retrieval_dev/v2t_r1`, `stage2/eval_test/bleu4`),
  against that stage's optimizer step;
- at the end, the final results (summary) and the figures the run makes (`curves.png`: loss, parts, lr
  and GPU telemetry; any trajectory plot under `<stage>/trajectories/`).

A resumed run continues the same tracker run: its id is kept in `<run>/trackers.json`. wandb and trackio
are optional extras (`pip install -e '.[track]'`); naming one that is not installed is a config error
(`sclslt.config.TRACKER_MODULES`). wandb follows its own settings (WANDB_MODE=offline writes `<run>/wandb/`,
WANDB_PROJECT,
WANDB_ENTITY); trackio writes its local store (TRACKIO_DIR, default ~/.cache/huggingface/trackio).
"""

from __future__ import annotations

import json
import secrets
from abc import ABC, abstractmethod
from pathlib import Path

from sclslt.registry import TRACKERS

IDS = "trackers.json"


def run_id(run_dir: Path, name: str) -> str:
    """The tracker run id of this run directory: made once, then read back (a resume continues the run)."""
    f = Path(run_dir) / IDS
    ids = json.loads(f.read_text()) if f.is_file() else {}
    if name not in ids:
        ids[name] = f"{Path(run_dir).name}-{secrets.token_hex(4)}"
        from sclslt.atomic import write_text

        write_text(f, json.dumps(ids, indent=1) + "\n")
    return ids[name]


class Tracker(ABC):
    @abstractmethod
    def start(self, run_dir: Path, config: dict, project: str) -> None:
        """Open (or continue) the tracker run of `run_dir` with the resolved `config`."""

    def start_stage(self, stage: str, run_dir: Path, step: int) -> None:
        """A stage (re)starts at optimizer step `step`."""

    @abstractmethod
    def log(self, stage: str, values: dict, step: int) -> None:
        """Scalars (names without the stage prefix) at the stage's optimizer step."""

    @abstractmethod
    def finish(self, results: dict | None, figures: list[Path]) -> None:
        """The final results and figures, then close."""


@TRACKERS.register("tensorboard")
class TensorBoard(Tracker):
    """Event files under `<run>/tensorboard/<stage>/`, one writer per stage; a resumed stage hides the events
    logged after its checkpoint (purge_step)."""

    def __init__(self):
        self.writers = {}

    def start(self, run_dir, config, project):
        self.root = Path(run_dir) / "tensorboard"

    def _writer(self, stage, purge_step=None):
        from torch.utils.tensorboard import SummaryWriter

        if stage not in self.writers:
            self.writers[stage] = SummaryWriter(str(self.root / stage), purge_step=purge_step, flush_secs=30)
        return self.writers[stage]

    def start_stage(self, stage, run_dir, step):
        if stage in self.writers:
            self.writers.pop(stage).close()
        self._writer(stage, purge_step=step + 1)

    def log(self, stage, values, step):
        w = self._writer(stage)  # a finished stage of a resumed run: opened on demand
        for k, v in values.items():
            w.add_scalar(k, float(v), step)

    def flush(self):
        for w in self.writers.values():
            w.flush()

    def finish(self, results, figures):
        for w in self.writers.values():
            w.close()
        self.writers = {}


@TRACKERS.register("wandb")
class Wandb(Tracker):
    def start(self, run_dir, config, project):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=project,
            id=run_id(run_dir, "wandb"),
            name=Path(run_dir).name,
            dir=str(run_dir),
            config=config,
            resume="allow",
        )
        self.stages = set()

    def log(self, stage, values, step):
        if stage not in self.stages:  # each stage's scalars against its own step axis
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self.stages.add(stage)
        self.run.log({f"{stage}/step": step, **{f"{stage}/{k}": float(v) for k, v in values.items()}})

    def finish(self, results, figures):
        if results is not None:
            self.run.summary.update(flatten(results))
        for f in figures:
            self.run.log({f"figures/{f.stem}": self.wandb.Image(str(f))})
        self.run.finish()


@TRACKERS.register("trackio")
class Trackio(Tracker):
    def start(self, run_dir, config, project):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(
            project=project,
            name=run_id(run_dir, "trackio"),
            config=config,
            resume="allow",
            auto_log_gpu=False,
            auto_log_cpu=False,
        )

    def log(self, stage, values, step):
        # one step axis per run in trackio: the stage's step is logged as a metric beside the values
        self.trackio.log({f"{stage}/step": step, **{f"{stage}/{k}": float(v) for k, v in values.items()}})

    def finish(self, results, figures):
        if results is not None:
            self.trackio.log({f"results/{k}": v for k, v in flatten(results).items() if isinstance(v, (int, float))})
        for f in figures:
            self.trackio.log({f"figures/{f.stem}": self.trackio.Image(str(f))})
        self.trackio.finish()


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def make_trackers(names: list[str]) -> list[Tracker]:
    return [TRACKERS.get(n)() for n in names]
