"""Progress and summaries on rank 0 with `rich`: a live bar (step, loss, clips/s, ETA) on a terminal,
plain log lines every `log_every` steps otherwise (CI logs, Slurm output files), and result tables.
Every step's values also go to `<stage>/metrics.csv` and to the run's trackers (`trackers`, chosen with
`train.report_to`: TensorBoard event files under `<run>/tensorboard/<stage>/` by default, wandb, trackio);
a resumed stage drops what was logged after its checkpoint from the CSV files and TensorBoard. Other
ranks stay quiet.
"""

from __future__ import annotations

import os
import time

from sclslt.atomic import write_text


class Reporter:
    def __init__(self, enabled: bool = True, log_every: int = 10):
        import sys

        from rich.console import Console

        self.enabled = enabled
        # log files get unwrapped lines and 120-column tables (rich would assume 80 columns)
        self.console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
        self.log_every = log_every
        self.progress = None
        self.trackers = []
        self.run_dir = None
        self.name = None  # the stage being trained (None: none started in this process)
        self.last_step = 0
        self.timings: list[dict] = []
        self.history: list[dict] = []
        self.stage_rows: list[list[str]] = []

    def open_trackers(self, run_dir, names: list[str], config: dict, project: str) -> None:
        """Start (or, for a resumed run, continue) the run's trackers; rank 0 only."""
        from pathlib import Path

        from sclslt.runtime.trackers import make_trackers

        if not self.enabled:
            return
        self.run_dir = Path(run_dir)
        self.trackers = make_trackers(names)
        for t in self.trackers:
            t.start(self.run_dir, config, project)

    def _log(self, values: dict, step: int, stage: str | None = None) -> None:
        for t in self.trackers:
            t.log(stage or self.name, values, step)

    def info(self, msg: str) -> None:
        if self.enabled:
            self.console.print(f"[bold cyan]sclslt[/] {msg}")

    def start_stage(self, name: str, total: int, start: int, global_batch: int, csv_path=None) -> None:
        self.name, self.total, self.start_step, self.global_batch = name, total, start, global_batch
        self.last_step = start
        self.timings = []
        self.t0 = time.time()
        from pathlib import Path

        self.csv_path = Path(csv_path) if csv_path is not None else None
        if self.enabled and self.csv_path is not None:
            for f in ("metrics.csv", "timing.csv", "telemetry.csv"):
                if self.csv_path.with_name(f).is_file():
                    self._truncate_after(start, self.csv_path.with_name(f))
        if not self.enabled:
            return
        if self.csv_path is not None:
            for t in self.trackers:
                t.start_stage(name, self.csv_path.parent.parent, start)
        if self.console.is_terminal and not os.environ.get("SCLSLT_PLAIN_LOG"):
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn(f"[bold]{name}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.task = self.progress.add_task(name, total=total, completed=start, stats="")
            self.progress.start()
        self.info(f"{name}: {total} optimizer steps of {global_batch} clips (starting at {start})")

    def step(self, step: int, values: dict, lr: float, epoch: int) -> None:
        if not self.enabled:
            return
        row = {k: float(v) for k, v in values.items()}
        row.update(step=step, lr=lr, epoch=epoch, stage=self.name, wall_s=round(time.time() - self.t0, 3))
        self.history.append(row)
        self.last_step = step
        self._csv(row)
        self._log({**{f"train/{k}": float(v) for k, v in values.items()}, "train/lr": lr}, step)
        done = step - self.start_step
        rate = done * self.global_batch / max(time.time() - self.t0, 1e-9)
        stats = " ".join(f"{k} {row[k]:.4f}" for k in values) + f" lr {lr:.2e} {rate:.1f} clips/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, stats=stats)
        elif step % self.log_every == 0 or step == self.total:
            eta = (self.total - step) * (time.time() - self.t0) / max(done, 1)
            self.console.print(f"{self.name} step {step}/{self.total} epoch {epoch} {stats} eta {eta:.0f}s")
            self.console.file.flush()  # line by line in log files too

    def _truncate_after(self, step: int, path) -> None:
        """A resumed stage drops the rows logged after its checkpoint (they will be logged again)."""
        lines = path.read_text().splitlines(keepends=True)
        if not lines:
            return
        col = lines[0].rstrip("\r\n").split(",").index("step")
        kept = [lines[0]] + [ln for ln in lines[1:] if float(ln.split(",")[col]) <= step]
        write_text(path, "".join(kept))

    def telemetry(self, step: int, per_rank: list[dict]) -> None:
        """One line per sample (every rank's GPU) and rows in <stage>/telemetry.csv."""
        if not self.enabled:
            return
        parts = [
            f"r{r} {t['gpu_util']:.0f}% {t['gpu_mem_gb']:.1f}GB {t['gpu_power_w']:.0f}W {t['gpu_temp_c']:.0f}C"
            for r, t in enumerate(per_rank)
            if t
        ]
        self.console.print(f"{self.name} step {step} gpu: " + " | ".join(parts))
        if self.csv_path is not None:
            for r, t in enumerate(per_rank):
                if t:
                    self._csv({"step": step, "rank": r, **t}, self.csv_path.with_name("telemetry.csv"))
                    self._log({f"gpu/rank{r}/{k}": float(v) for k, v in t.items()}, step)

    def timing(self, step: int, row: dict) -> None:
        """A sampled step's time breakdown: <stage>/timing.csv, TensorBoard, and the stage summary."""
        if not self.enabled:
            return
        self.timings.append(row)
        if self.csv_path is not None:
            self._csv({"step": step, **row}, self.csv_path.with_name("timing.csv"))
        self._log({f"time/{k}": v for k, v in row.items()}, step)

    def scalars(self, values: dict, prefix: str, stage: str | None = None) -> None:
        """Evaluation numbers (retrieval recall, BLEU) for a stage's trackers (default: the current one), at
        its last step in this process (0 for a finished stage that a resume did not train)."""
        stage = stage or self.name
        if self.enabled and stage is not None:
            self._log(
                {f"{prefix}/{k}": float(v) for k, v in values.items() if isinstance(v, (int, float))},
                self.last_step if stage == self.name else 0,
                stage,
            )
            for t in self.trackers:
                getattr(t, "flush", lambda: None)()

    def finish_trackers(self, result: dict | None) -> None:
        """The final results and the run's figures (`curves.png`, trajectory plots) to every tracker, then close."""
        figures = []
        if self.run_dir is not None and result is not None:
            from sclslt.runtime.plots import plot_curves

            curves = plot_curves(self.run_dir)
            figures = ([curves] if curves else []) + sorted(self.run_dir.glob("*/trajectories*/*.png"))
        for t in self.trackers:
            t.finish(result, figures)
        self.trackers = []

    def _csv(self, row: dict, path=None) -> None:
        """Append one row per step (a resumed stage appends to the same file)."""
        if self.csv_path is None:
            return
        import csv
        from pathlib import Path

        path = Path(path or self.csv_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)

    def end_stage(self, name: str, step: int) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.enabled:
            wall = time.time() - self.t0
            last = [r for r in self.history if r["stage"] == name][-1:] or [{}]
            self.stage_rows.append([name, str(step), f"{wall:.1f}", f"{last[0].get('loss', float('nan')):.4f}"])
            self.info(f"{name}: done at step {step} in {wall:.1f}s")
            if self.timings:  # mean over the sampled steps
                keys = [k for k in self.timings[0]]
                mean = {k: sum(r[k] for r in self.timings) / len(self.timings) for k in keys}
                self.info(
                    f"{name}: step time over {len(self.timings)} sampled steps: "
                    + ", ".join(
                        f"{k.removesuffix('_ms')} {v:.1f} ms" if k.endswith("_ms") else f"{k} {v:.2f}"
                        for k, v in mean.items()
                    )
                )
            for t in self.trackers:
                getattr(t, "flush", lambda: None)()

    def results(self, result: dict) -> None:
        if not self.enabled:
            return
        from rich.table import Table

        t = Table(title="stages")
        for c in ("stage", "steps", "wall s", "last loss"):
            t.add_column(c)
        for r in self.stage_rows:
            t.add_row(*r)
        self.console.print(t)
        m, b = result["model"], result["trivial_baseline"]
        self.scalars(m, f"eval_{result['split']}", (result.get("selected_checkpoint") or {}).get("stage"))
        self.finish_trackers(result)
        t = Table(title=f"{result['split']} split ({m['n']} clips, beam {result['beam']})")
        for c in ("system", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "chrF"):
            t.add_column(c)
        for label, r in (("model", m), ("trivial: most frequent train sentence", b)):
            t.add_row(label, *(f"{r[k]:.2f}" for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "chrf")))
        self.console.print(t)
        self.console.print(f"sacrebleu signatures: BLEU {m['bleu_signature']}  chrF {m['chrf_signature']}")
        sel = result.get("selected_checkpoint")
        if sel:
            self.console.print(f"evaluated checkpoint: {sel['stage']}/{sel['tag']} ({sel['rule']})")
