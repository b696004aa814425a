"""Two CPU ranks through the real `deepspeed` launcher (ZeRO-1/2/3, offload, mpirun; gloo) against one
plain-PyTorch process, step by step.

The product saves a checkpoint after every step. For each step k the reference loads the product's
state after step k-1 (parameters, buffers, both Adam moments, read through DeepSpeed's universal
form, and the LR position) into one process and torch.optim.AdamW, rebuilds the global batch of step
k, forwards each rank's micro-batch on its own (BatchNorm statistics are per micro-batch, as on the
ranks), takes each rank's contrastive rows against the concatenated columns and normalises the
translation loss by the global token count, clips, and steps. The product's loss, LR, parameters and
moments after step k must equal that step's: results may not depend on the number of ranks, and a
ZeRO release with wrong gradients fails here at the step where it goes wrong.

Why step by step: the model max-pools, so its gradient is discontinuous. Comparing whole
trajectories let fp32 rounding differences (summation order: ranks vs one process; vector width:
AVX2 vs the CPU's other kernels) compound until one max-pool argmax flipped and Adam turned that into
an O(lr) move; the old test failed that way on some CPUs (reproduced with ATEN_CPU_CAPABILITY=default)
although every single step was right to 1e-8. From identical states a step cannot flip a routing in
the forward pass, and a mutation (per-GPU-only negatives at one step) shows the test still fails on
a wrong gradient. An interrupted run plus `--resume` must reproduce the uninterrupted trajectory.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sclslt.config import load_config
from sclslt.data.corpus import resolve_shards_dir
from sclslt.data.loader import Collate
from sclslt.data.text import load_tokenizer
from sclslt.model.close_text import CLOSE_FILE, CloseSentences
from sclslt.model.heads import get_head
from sclslt.model.losses import contrastive_from_columns, pad_cat, translation_loss_sum
from sclslt.model.objective import forward, set_trainable
from sclslt.model.slt import SLTModel
from sclslt.runtime.checkpoints import load_module_state, safe_load
from sclslt.runtime.context import STAGES, stage_seed
from sclslt.selection.batches import global_stream, random_batches
from sclslt.train.schedule import seed_everything
from tests.helpers import ROOT, TRAIN_ENV

WORLD = 2
STEPS = 8  # crosses an epoch boundary (6 global batches per epoch)


@pytest.fixture(scope="module")
def exp(tiny_cfg_dict, tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    cfg = yaml.safe_load(yaml.safe_dump(tiny_cfg_dict))
    cfg["data"]["synthetic"]["n_train"] = 48
    # every per-clip draw in play: temporal subsampling, random crops and augmentation (drawn per clip, so
    # the same at any world size)
    cfg["data"].update(max_frames=12, crop=14, augment=True)
    cfg["train"]["max_steps"] = STEPS
    for st in ("stage1", "stage2"):
        # Adam's eps well above fp32 noise: elements whose true gradient is ~0 (a dead GELU unit) would
        # otherwise take +-lr steps decided by rounding noise, which differs with the summation order
        cfg[st].update(epochs=2, adam_eps=1e-5)
    cfg["checkpoint"] = {"every_steps": 3, "keep": 2}
    path = d / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return d, path


def launch(cfg_path: Path, run_dir: Path, port: int, *extra: str, ds: str = "configs/zero2.json", world: int = WORLD):
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [
        str(deepspeed) if deepspeed.exists() else "deepspeed",
        "--num_accelerators",
        str(world),
        "--master_port",
        str(port),
        "launch/train.py",
        "--deepspeed",
        ds,
        "--config",
        str(cfg_path),
        "--train.run_dir",
        str(run_dir),
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=TRAIN_ENV, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"launcher failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    # DeepSpeed's CPU backend leaves a 66 MiB /dev/shm buffer per rank unless the trainer removes it
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return proc


def ds_tool(port: int, *args: str) -> str:
    """A tool under the real `deepspeed` launcher on WORLD CPU ranks; its stdout, or a failure that shows
    what the ranks printed (the launcher's exit code alone says only which signal ended a rank)."""
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [
        str(deepspeed) if deepspeed.exists() else "deepspeed",
        "--num_accelerators",
        str(WORLD),
        "--master_port",
        str(port),
        *args,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=TRAIN_ENV, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


def metrics(run_dir: Path, stage: str) -> list[dict]:
    with open(run_dir / stage / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items() if k != "stage"} for r in csv.DictReader(f)]


def global_batches(cfg, name: str, shards: Path, collate, step: int, world: int = 1) -> list:
    """Each rank's micro-batch of global batch `step` (0-based) at `world` ranks, rebuilt in this process
    (world 1: the whole global batch as one)."""
    per_epoch = len(random_batches(cfg, name, shards, 0))
    epoch, pos = divmod(step, per_epoch)
    batches = random_batches(cfg, name, shards, epoch)
    seed = stage_seed(cfg, name)
    return [
        collate(next(iter(global_stream(cfg, shards, batches, r, world, seed, epoch, skip=pos)))) for r in range(world)
    ]


def batch_log(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / stage / "batches.jsonl").read_text().splitlines()]


def expected_log(cfg, name: str, shards: Path, steps: int) -> list[dict]:
    """The audit trail an uninterrupted random-batch run must write: epoch_order's batches, step by step."""
    per_epoch = len(random_batches(cfg, name, shards, 0))
    return [
        {
            "step": k + 1,
            "epoch": k // per_epoch,
            "keys": random_batches(cfg, name, shards, k // per_epoch)[k % per_epoch],
        }
        for k in range(steps)
    ]


def global_loss(model, batches: list, st, cfg, local_negatives: bool = False, close=None) -> torch.Tensor:
    """The global-batch loss in one process: each rank's micro-batch forwarded on its own (BatchNorm
    statistics are per micro-batch, as on the ranks), the translation loss normalised by the global token
    count, each rank's contrastive rows against the concatenated columns. `local_negatives`: each rank's
    rows against its own columns only (the per-GPU-negatives bug; the tests' mutation check). `close`: the
    run's close-text pairs (`close_text`), masked or weighted in every rank's rows."""
    outs = [forward(model, b, st) for b in batches]
    world = len(batches)
    loss = torch.zeros(())
    if st.translation_weight > 0:
        n_tok = sum(int((b.labels != -100).sum()) for b in batches)
        ce = sum(translation_loss_sum(o["logits"], b.labels, st.label_smoothing) for o, b in zip(outs, batches))
        loss = loss + st.translation_weight * ce / n_tok
    if st.contrastive_weight > 0:
        sim = cfg.model.similarity
        cat = torch.cat if sim == "pooled" else pad_cat
        groups = [[o] for o in outs] if local_negatives else [outs] * world
        nce = 0.0
        for r, (o, bt) in enumerate(zip(outs, batches)):
            cols = {k: cat([g[k] for g in groups[r]]) for k in get_head(sim).columns}
            cols["ids"] = bt.sentence_ids if local_negatives else torch.cat([b.sentence_ids for b in batches])
            offset = 0 if local_negatives else r * len(bt)
            nce = nce + contrastive_from_columns(o, bt.sentence_ids, cols, offset, sim, cfg.model.cico_tau, close)
        loss = loss + st.contrastive_weight * nce / world
    return loss


ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def universal(ckpt_dir: Path, tag: str) -> Path:
    """DeepSpeed's universal form of checkpoint `tag` (made once, beside the product's own conversions):
    DeepSpeed's converter called in this process (0.7 s a tag; a subprocess, as the product's
    `to_universal` runs it, pays 3-4 s of imports each time)."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as convert

    out = ckpt_dir / "universal" / tag
    if not (out / "zero").is_dir():
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            convert(
                argparse.Namespace(
                    input_folder=str(ckpt_dir / tag),
                    output_folder=str(out),
                    num_extract_workers=1,
                    num_merge_workers=1,
                    keep_temp_folder=False,
                    strict=True,
                    inject_missing_state=True,
                )
            )
    return out


def adam_state(ckpt_dir: Path, tag: str) -> dict:
    """Per-parameter fp32 master and Adam moments of a checkpoint, whatever its ZeRO stage and world size,
    read through DeepSpeed's universal form (the product's own conversion)."""

    def read(f: Path) -> torch.Tensor:
        x = torch.load(f, weights_only=False)
        return x["param"] if isinstance(x, dict) else x  # ZeRO-1/2 files wrap the tensor, ZeRO-3 files do not

    zero = universal(Path(ckpt_dir), tag) / "zero"
    return {
        p.name: {k: read(p / f"{k}.pt") for k in ("fp32", *ADAM_KEYS)}
        for p in zero.iterdir()
        if (p / "exp_avg.pt").is_file()
    }  # parameters, not buffers


def stepwise(cfg_path: Path, run_dir: Path, *overrides: str, local_negatives_at: int = 0) -> dict:
    """Every step of the product's run, retaken in one plain-PyTorch process from the product's own state.

    The run must have saved a checkpoint after every step (`--checkpoint.every_steps 1 --checkpoint.keep
    0`) and each stage's start (`--checkpoint.every_epochs 1`: tag epoch0000). For step k: the parameters,
    buffers, both Adam moments and the LR position of checkpoint k-1 go into torch.optim.AdamW, which
    takes step k on global batch k as ONE process forms it (world 1: the whole batch in one forward); its
    loss, its LR and its parameters and moments afterwards are compared with the product's step k by the
    caller: a step at WORLD ranks is world 1's step, global BatchNorm statistics and clip draws included.
    Rounding differences therefore cannot compound across steps into a discrete routing change
    (a max-pool argmax, a ReLU boundary), which is what made whole-trajectory comparisons fail on some
    CPUs (see this module's docstring). `local_negatives_at=k` retakes step k of stage 1 with per-GPU-only
    negatives as well (the mutation the test must catch); returned under "mutated".

    Returns {stage: [per step: {"loss", "lr_next", "param_err", "moment_err"}]} and "mutated" if asked."""
    torch.set_num_threads(1)  # the ranks' summation order (OMP_NUM_THREADS=1)
    return _stepwise(cfg_path, run_dir, overrides, local_negatives_at)


def _stepwise(cfg_path: Path, run_dir: Path, overrides: tuple, local_negatives_at: int) -> dict:
    cfg = load_config(cfg_path, ["--train.run_dir", str(run_dir), *overrides])
    tok = load_tokenizer(run_dir / "tokenizer")
    shards = resolve_shards_dir(cfg.data)
    collate = Collate(tok)
    model = SLTModel(cfg.model, tok, cfg.data).train()
    out = {}
    for name in STAGES:
        st = getattr(cfg, name)
        if not st.enabled:
            continue
        ckpt = run_dir / name / "checkpoints"
        set_trainable(model, st)
        close = None  # the run's close-text pairs (their construction: test_false_negatives)
        if st.mask_close_text > 0 and st.contrastive_weight > 0:
            close = CloseSentences.load(run_dir / name / "selection" / CLOSE_FILE, st.soft_close_text)
        f = reference_lr(st.epochs * len(random_batches(cfg, name, shards, 0)), st.warmup_steps, st.min_lr_ratio)
        out[name], before = [], None  # no Adam state before a stage's first step
        for step in range(1, len(metrics(run_dir, name)) + 1):
            prev = "epoch0000" if step == 1 else f"step{step - 1:08d}"
            after = adam_state(ckpt, f"step{step:08d}")
            args = (model, st, cfg, ckpt, prev, step, st.lr * f(step - 1), close)
            whole = global_batches(cfg, name, shards, collate, step - 1)
            out[name].append({**one_step(*args, whole, before, after), "lr_next": st.lr * f(step)})  # LR after a step
            if name == "stage1" and step == local_negatives_at:
                split = global_batches(cfg, name, shards, collate, step - 1, WORLD)
                out["mutated"] = one_step(*args, split, before, after, local_negatives=True)
            before = after
    return out


def reference_lr(total: int, warmup: int, min_ratio: float):
    """The README's schedule, written out here (not the product's lr_lambda): the LR factor of optimizer step
    k (0-based) is (k + 1) / warmup during the warm-up, then min_ratio + (1 - min_ratio)(1 + cos(pi p)) / 2 with
    p = (k - warmup) / (total - warmup) the cosine's progress."""

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        p = min(1.0, (k - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * p)) / 2

    return factor


def reference_groups(model, weight_decay: float) -> list[dict]:
    """AdamW's groups by the README's rule, written out here: weight decay on every trainable matrix (linear,
    convolution and embedding weights), none on vectors (biases, norm scales and shifts, the logit scale)."""
    named = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in named if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in named if p.ndim < 2], "weight_decay": 0.0},
    ]


def one_step(
    model,
    st,
    cfg,
    ckpt: Path,
    prev: str,
    step: int,
    lr: float,
    close,
    batches: list,
    before: dict | None,
    after: dict,
    local_negatives: bool = False,
) -> dict:
    """Load checkpoint `prev` and its Adam state `before` (None: a fresh optimizer) into `model` and AdamW,
    take one step, and measure it against the product's state `after` (errors relative to each scale)."""
    model.load_state_dict(load_module_state(ckpt, prev))
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(reference_groups(model, st.weight_decay), lr=lr, betas=(0.9, 0.999), eps=st.adam_eps)
    if before is not None:
        for n, p in named.items():
            assert torch.equal(before[n]["fp32"].view_as(p), p.detach()), f"{prev}: {n} master != module weight"
            opt.state[p] = {
                "step": torch.tensor(float(step - 1)),
                **{k: before[n][k].view_as(p).clone() for k in ADAM_KEYS},
            }
    loss = global_loss(model, batches, st, cfg, local_negatives, close)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(list(named.values()), cfg.train.grad_clip)
    opt.step()
    errs = {}
    for key, mine in (("fp32", lambda p: p.detach()), *((k, lambda p, k=k: opt.state[p][k]) for k in ADAM_KEYS)):
        scale = max(after[n][key].abs().max().item() for n in named)
        errs[key] = max((after[n][key].view_as(p) - mine(p)).abs().max().item() for n, p in named.items()) / scale
    return {"loss": loss.item(), "param_err": errs["fp32"], "moment_err": max(errs[k] for k in ADAM_KEYS)}


STEP_TOL = 1e-5  # of each quantity's scale; rounding gives ~1e-7, a wrong gradient ~1e-1 (the mutation)
EVERY_STEP = ("--checkpoint.every_steps", "1", "--checkpoint.keep", "0", "--checkpoint.every_epochs", "1")


def assert_stepwise(run: Path, got: dict, what: str, moment_tol: float = STEP_TOL) -> None:
    """The product's logged loss and LR and its state after every step equal the one-process step."""
    for name, steps in got.items():
        if name == "mutated":
            continue
        rows = metrics(run, name)
        assert len(rows) == len(steps) > 0, (what, name)
        for k, (row, ref) in enumerate(zip(rows, steps), 1):
            where = f"{what} {name} step {k}"
            assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6), where
            assert row["lr"] == pytest.approx(ref["lr_next"], rel=1e-9), where
            assert ref["param_err"] < STEP_TOL, f"{where}: parameters differ by {ref['param_err']:.2e} of scale"
            assert ref["moment_err"] < moment_tol, f"{where}: Adam moments differ by {ref['moment_err']:.2e} of scale"


def assert_params_close(ckpt_dir: Path, want: dict, what: str, tol: float) -> None:
    got = load_module_state(ckpt_dir)
    assert set(want) <= set(got), f"{what}: missing {set(want) - set(got)}"
    worst = max((got[k] - v).abs().max().item() for k, v in want.items())
    assert worst < tol, f"{what}: parameters differ by up to {worst:.2e}"


def assert_stage_starts(cfg_path: Path, run: Path, *overrides: str) -> None:
    """Stage 1 starts from the seeded initialisation, stage 2 from stage 1's final weights."""
    cfg = load_config(cfg_path, ["--train.run_dir", str(run), *overrides])
    seed_everything(cfg.train.seed)
    init = SLTModel(cfg.model, load_tokenizer(run / "tokenizer")).state_dict()
    start = load_module_state(run / "stage1" / "checkpoints", "epoch0000")
    assert all(torch.equal(start[k], v) for k, v in init.items() if v.is_floating_point()), "stage1 start"
    if cfg.stage2.enabled:
        end1 = load_module_state(run / "stage1" / "checkpoints")
        start2 = load_module_state(run / "stage2" / "checkpoints", "epoch0000")
        assert all(torch.equal(start2[k], v) for k, v in end1.items() if k in start2), "stage2 start"


def test_two_ranks_equal_one_process_and_resume_reproduces(exp):
    d, cfg_path = exp
    run = d / "run"
    launch(cfg_path, run, 29611, *EVERY_STEP, "--data.num_workers", "2")
    assert_stage_starts(cfg_path, run)
    cfg = load_config(cfg_path)
    for name in STAGES:  # the audit trail: epoch_order's global batches, whatever the ranks and workers
        assert batch_log(run, name) == expected_log(cfg, name, resolve_shards_dir(cfg.data), STEPS), name
    got = stepwise(cfg_path, run, local_negatives_at=2)
    assert [len(got[name]) for name in STAGES] == [STEPS, STEPS]
    assert_stepwise(run, got, "zero2")
    # the test can fail: per-GPU-only negatives at one step of stage 1 are seen at once
    assert got["mutated"]["param_err"] > 100 * STEP_TOL and got["mutated"]["moment_err"] > 1e4 * STEP_TOL, got[
        "mutated"
    ]
    losses = [r["loss"] for r in metrics(run, "stage1")]
    assert losses[-1] < losses[0]  # it learns, it is not a constant

    # the same run, interrupted after 3 steps of stage 1, then resumed and extended
    part = d / "resumed"
    launch(cfg_path, part, 29612, "--train.max_steps", "3", "--stage2.enabled", "false")
    assert len(metrics(part, "stage1")) == 3 and not (part / "stage2").exists()
    proc = launch(cfg_path, part, 29613, "--resume")
    assert "resumed at step 3" in proc.stdout
    for name in STAGES:
        a, b = metrics(run, name), metrics(part, name)
        assert [r["step"] for r in b] == list(range(1, STEPS + 1))
        assert [r["lr"] for r in b] == pytest.approx([r["lr"] for r in a], rel=1e-12)  # no LR jump
        assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6), name
        want = {k: v for k, v in load_module_state(run / name / "checkpoints").items()}
        assert_params_close(part / name / "checkpoints", want, name + " (resumed)", tol=1e-6)

    # a finished run is not silently overwritten
    with pytest.raises(AssertionError, match="pass --resume"):
        launch(cfg_path, run, 29614)


def test_resume_at_another_world_size_two_ranks_to_one_and_back(exp):
    """2 ranks write the checkpoint, 1 rank resumes it (DeepSpeed universal checkpoint: parameters, Adam
    moments, LR schedule re-partitioned), then 2 ranks resume the 1-rank checkpoint. Every step, the two
    after each change included, equals plain AdamW's step from the checkpoint before it on the same
    global batch: nothing of the optimizer state, the data position or the batch sequence is lost.
    Mutation caught (checked): the reseed after a world-size change deleted (sclslt/train/stage.py `Stage._resume`)."""
    d, cfg_path = exp
    run = d / "elastic"
    args = ("--stage2.enabled", "false", *EVERY_STEP)
    launch(cfg_path, run, 29650, *args, "--train.max_steps", "3")
    one = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--config",
            str(cfg_path),
            "--train.run_dir",
            str(run),
            *args,
            "--train.max_steps",
            "5",
            "--resume",
        ],
        cwd=ROOT,
        env=TRAIN_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert "written by 2 ranks, now 1" in one.stdout
    back = launch(cfg_path, run, 29651, *args, "--train.max_steps", str(STEPS), "--resume")
    assert "written by 1 ranks, now 2" in back.stdout
    # the random streams after a change are new ones, a function of the position: rank 0's torch generator two
    # steps after the 2 -> 1 resume (at step 3) is not where the fresh 2-rank run's was two steps after its
    # start (without the reseed the resumed process would replay its start's stream: dropout masks repeated)
    rng = lambda tag: safe_load(run / "stage1" / "checkpoints" / tag / "rng_rank00000.pt")["torch"]
    assert not torch.equal(rng("step00000005"), rng("step00000002"))
    assert not torch.equal(rng("step00000004"), rng("step00000001"))

    got = stepwise(cfg_path, run, "--stage2.enabled", "false")
    assert [r["step"] for r in metrics(run, "stage1")] == list(range(1, STEPS + 1))
    assert_stepwise(run, got, "2 -> 1 -> 2")  # the LR too: it follows the schedule across both changes
    # resumed in the middle of epoch 0 (step 3 of 6) at another world size, and back in epoch 1: the very
    # global batches of the uninterrupted run, one audit line per step
    cfg = load_config(cfg_path)
    assert batch_log(run, "stage1") == expected_log(cfg, "stage1", resolve_shards_dir(cfg.data), STEPS)


def test_one_and_four_ranks_train_on_the_same_batches_and_take_world_ones_steps(exp, train_env):
    """World 1 with no loader workers and world 4 (global batch 8: micro-batches of 2) write the audit trail
    of the world-2 run (the main test), and every step at 4 ranks is world 1's step from the same state."""
    d, cfg_path = exp
    args = ("--stage2.enabled", "false", "--train.max_steps", "7")
    one = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--config",
            str(cfg_path),
            "--train.run_dir",
            str(d / "w1"),
            *args,
            "--data.num_workers",
            "0",
        ],
        cwd=ROOT,
        env=train_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    launch(cfg_path, d / "w4", 29640, *args, *EVERY_STEP, "--data.num_workers", "1", world=4)
    cfg = load_config(cfg_path)
    want = expected_log(cfg, "stage1", resolve_shards_dir(cfg.data), 7)
    assert batch_log(d / "w1", "stage1") == want and batch_log(d / "w4", "stage1") == want
    # Adam moments to 1e-4 of their scale: at 4 ranks each convolution's weight gradient is summed over micro-batches
    # of 2 clips, in another order than world 1's 8; on a Sapphire Rapids Xeon (oneDNN, AVX-512) that moves the first
    # convolutions' first moment by up to 7.7e-5 of its scale at step 7 (measured), with the parameters within 3e-6.
    # A wrong gradient moves them by ~1e-1 (the main test's mutation).
    assert_stepwise(d / "w4", stepwise(cfg_path, d / "w4", *args), "world 4", moment_tol=1e-4)
    # and the first step (same initial weights, same batch) gives world 1's loss at 4 ranks
    assert metrics(d / "w4", "stage1")[0]["loss"] == pytest.approx(metrics(d / "w1", "stage1")[0]["loss"], rel=1e-5)


CLOSE_SOFT = ("--stage1.mask_close_text", "0.5", "--stage1.soft_close_text", "0.3", "--model.cico_directions", "split")
CLOSE_COSINE = ("--stage1.mask_close_text", "0.8", "--stage1.mask_close_text_kind", "cosine")


@pytest.mark.parametrize(
    "zero,similarity,close", [("1", "cico", CLOSE_SOFT), ("3", "pooled", CLOSE_COSINE), ("3_offload", "pooled", ())]
)
def test_other_zero_stages_equal_one_process(exp, zero, similarity, close):
    """ZeRO-1, ZeRO-3 (parameters partitioned; weights consolidated through zero_to_fp32 for the
    stage transfer; beam search with partitioned parameters) and ZeRO-3 with the optimizer offloaded to
    the host (DeepSpeed's CPU AdamW) take the same steps as plain PyTorch, with CiCo similarity
    (token features gathered with padding) on one of them, and the close-text losses (docs/pair_selection.md) on two:
    Jaccard-close columns as soft positives (CiCo, with one term per direction: cico_directions split),
    cosine-close ones masked (pooled)."""
    d, cfg_path = exp
    run = d / f"zero{zero}"
    extra = ("--train.max_steps", "4", "--model.similarity", similarity, *close)
    if zero.startswith("3"):
        # 17 dev clips: the ranks decode 2 and 1 batches, which partitioned parameters cannot follow
        # in lockstep (evaluation runs on a gathered plain copy instead)
        extra += ("--data.synthetic.n_dev", "17")
    launch(cfg_path, run, 29620 + len(zero) + int(zero[0]), *extra, *EVERY_STEP, ds=f"configs/zero{zero}.json")
    assert_stage_starts(cfg_path, run, *extra)
    # offload: DeepSpeed's CPU Adam (its own SIMD kernel) rounds the moments differently, 1.3e-5 of their
    # scale at step 1; 1e-4 still catches per-GPU negatives (0.35 in the main test) by 3,500x
    assert_stepwise(
        run, stepwise(cfg_path, run, *extra), f"zero{zero}", moment_tol=1e-4 if zero.endswith("offload") else STEP_TOL
    )
    assert (run / "results.json").is_file()
    if close:  # the pairs exist, so the loss above was not the plain one
        assert len(CloseSentences.load(run / "stage1" / "selection" / CLOSE_FILE).codes) > 0


def test_export_of_a_zero3_run_translates_its_test_split_as_the_run_did(exp, tmp_path):
    """`sclslt export` consolidates a 2-rank ZeRO-3 run's partitioned weights: the exported model
    decodes the test split, in the ranks' micro-batches, to exactly the run's hypotheses."""
    from sclslt.eval.export import export_run
    from sclslt.eval.hub import SignTranslator
    from tests.e2e.test_export import decode_split, hypotheses

    d, cfg_path = exp
    run = d / "zero3"
    if not (run / "results.json").is_file():  # this test alone: the ZeRO-3 run of the test above
        launch(
            cfg_path,
            run,
            29626,
            "--train.max_steps",
            "4",
            "--model.similarity",
            "pooled",
            *CLOSE_COSINE,
            "--data.synthetic.n_dev",
            "17",
            ds="configs/zero3.json",
        )
    hub = SignTranslator.from_pretrained(export_run(run, tmp_path / "zero3_export"))
    cfg = load_config(run / "config.yaml")
    assert decode_split(hub, resolve_shards_dir(cfg.data), cfg, world=WORLD) == hypotheses(run)
    res = json.loads((run / "results.json").read_text())
    assert res["world"] == WORLD
    # the weights are the ranks' fp32 masters of the selected checkpoint, read through DeepSpeed's own
    # universal conversion (independent of the product's consolidation)
    sel = res["selected_checkpoint"]
    masters = adam_state(run / sel["stage"] / "checkpoints", sel["tag"])
    mine = hub.model.state_dict()
    assert masters and all(torch.equal(mine[n], m["fp32"].view_as(mine[n])) for n, m in masters.items())
    # `sclslt evaluate` under the launcher (each rank decodes its slice, rank 0 gathers) gets the run's own
    # evaluation of its selected checkpoint
    report = tmp_path / "eval.json"
    ds_tool(29627, "--module", "sclslt.cli", "evaluate", "--run", str(run), "--out", str(report))
    got = json.loads(report.read_text())
    assert got["model"] == res["model"] and {r["key"]: r["hyp"] for r in got["hypotheses"]} == hypotheses(run)


def test_pair_selection_over_two_ranks_equals_one_planner(exp):
    """Reference run with epoch checkpoints -> 2-rank table export -> 2-rank PS run whose global
    batches equal the single-process planner's on the same pools; then the self-referenced mode."""
    import json

    from sclslt.data.shards import read_manifest
    from sclslt.eval.retrieval import embed_split
    from sclslt.runtime.rundir import load_run_model
    from sclslt.selection.planner import Planner
    from sclslt.selection.table import load_table

    d, cfg_path = exp
    ref = d / "ref"
    launch(
        cfg_path, ref, 29631, "--stage2.enabled", "false", "--train.max_steps", "0", "--checkpoint.every_epochs", "1"
    )
    tags = sorted(p.name for p in (ref / "stage1" / "checkpoints").iterdir() if p.name.startswith("epoch"))
    assert tags == ["epoch0000", "epoch0001", "epoch0002"]

    table_path = d / "ref.safetensors"
    ds_tool(
        29632,
        "--module",
        "sclslt.cli",
        "reference",
        "--run",
        str(ref),
        "--early",
        "epoch0000",
        "--late",
        "epoch0002",
        "--out",
        str(table_path),
    )
    table = load_table(table_path)
    cfg = load_config(cfg_path, ["--train.run_dir", str(ref)])
    shards = resolve_shards_dir(cfg.data)
    manifest = read_manifest(shards, "train")
    assert table.keys == [s[0] for s in manifest["samples"]]
    # the exported late view is what the late checkpoint's model gives in one process
    model, tok, _ = load_run_model(ref, ref / "stage1" / "checkpoints", "epoch0002")
    one = embed_split(model, shards, "train", tok, "cpu", max_frames=cfg.data.max_frames)
    assert torch.allclose(table.v1, one["video"].double(), atol=1e-5)
    assert torch.allclose(table.t1, one["text"].double(), atol=1e-5)
    assert not torch.allclose(table.v0, table.v1)

    # CiCo-scored table (2 ranks): its dense delta is the one-process CiCo similarity of the token
    # features at the late checkpoint minus at the early one; its pooled views are the pooled table's
    cico_path = d / "ref_cico.safetensors"
    out = ds_tool(
        29637,
        "--module",
        "sclslt.cli",
        "reference",
        "--run",
        str(ref),
        "--early",
        "epoch0000",
        "--late",
        "epoch0002",
        "--score",
        "cico",
        "--out",
        str(cico_path),
    )
    assert "Spearman" in out
    cico = load_table(cico_path)
    early_model, _, _ = load_run_model(ref, ref / "stage1" / "checkpoints", "epoch0000")
    views = [
        embed_split(m, shards, "train", tok, "cpu", head="cico", max_frames=cfg.data.max_frames)
        for m in (early_model, model)
    ]
    from sclslt_kernels import cico_similarity_reference

    want = [
        cico_similarity_reference(
            e["video_tokens"], e["video_mask"], e["text_tokens"], e["text_mask"], cfg.model.cico_tau
        ).double()
        for e in views
    ]
    assert cico.delta is not None and torch.allclose(cico.delta, want[1] - want[0], atol=1e-5)
    assert torch.allclose(cico.v1, table.v1) and cico.keys == table.keys

    # the sharded, resumable export (one part per rank, nothing gathered) holds the same table
    sharded = d / "ref_sharded"

    def export_sharded(*extra):
        return ds_tool(
            29638,
            "--module",
            "sclslt.cli",
            "reference",
            "--run",
            str(ref),
            "--early",
            "epoch0000",
            "--late",
            "epoch0002",
            "--out",
            str(sharded),
            *extra,
        )

    export_sharded()
    whole = load_table(sharded)
    assert whole.keys == table.keys and all(
        torch.allclose(getattr(whole, v), getattr(table, v)) for v in ("v0", "t0", "v1", "t1")
    )
    parts = sorted(sharded.glob("part-*.safetensors"))
    assert len(parts) == WORLD
    parts[1].unlink()  # an interrupted export: rank 1's part is missing
    out = export_sharded("--resume")
    assert "rank 0: kept" in out and "rank 1: wrote" in out
    assert torch.equal(load_table(sharded).v1, whole.v1)

    ps = d / "ps"  # with the separation of pairs close at both checkpoints
    sep = ("--selection.separate_close", "0.05")
    ps_args = ("--stage2.enabled", "false", "--selection.mode", "ps", "--selection.table", str(table_path), *sep)
    launch(cfg_path, ps, 29633, *ps_args, "--train.max_steps", "0")
    ps_cfg = load_config(cfg_path, list(ps_args[2:]))
    keys = [s[0] for s in manifest["samples"]]
    for epoch in range(ps_cfg.stage1.epochs):
        want = Planner(ps_cfg.selection, ps_cfg.stage1.global_batch, stage_seed(ps_cfg, "stage1")).plan_epoch(
            keys, epoch, ps_cfg.stage1.epochs, lambda k: table
        )
        got = json.loads((ps / "stage1" / "selection" / f"plan_e{epoch:04d}.json").read_text())
        assert got == want, epoch
    assert [r["step"] for r in metrics(ps, "stage1")] == list(range(1, 13))
    assert [r["keys"] for r in batch_log(ps, "stage1")] == [
        b for e in range(2) for b in json.loads((ps / "stage1" / "selection" / f"plan_e{e:04d}.json").read_text())
    ]
    # the same plans at 1 and 4 ranks (into epoch 1, whose quantile differs from epoch 0's)
    one = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--config",
            str(cfg_path),
            "--train.run_dir",
            str(d / "ps1"),
            *ps_args,
            "--train.max_steps",
            "7",
        ],
        cwd=ROOT,
        env=TRAIN_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    launch(cfg_path, d / "ps4", 29639, *ps_args, "--train.max_steps", "7", world=4)
    for other in ("ps1", "ps4"):
        for epoch in (0, 1):
            f = f"plan_e{epoch:04d}.json"
            assert (d / other / "stage1" / "selection" / f).read_text() == (ps / "stage1" / "selection" / f).read_text()
        assert batch_log(d / other, "stage1") == batch_log(ps, "stage1")[:7], other

    # interrupted mid-epoch (step 3 of 6) and resumed: the same planned batches, the same losses
    part = d / "ps_resumed"  # planned from the sharded table: the same plans
    ps_args = ("--stage2.enabled", "false", "--selection.mode", "ps", "--selection.table", str(sharded), *sep)
    launch(cfg_path, part, 29635, *ps_args, "--train.max_steps", "3")
    launch(cfg_path, part, 29636, *ps_args, "--train.max_steps", "0", "--resume")
    for f in sorted((ps / "stage1" / "selection").glob("plan_*.json")):
        assert (part / "stage1" / "selection" / f.name).read_text() == f.read_text(), f.name
    assert [r["loss"] for r in metrics(part, "stage1")] == pytest.approx(
        [r["loss"] for r in metrics(ps, "stage1")], rel=1e-6
    )


def test_self_mode_plans_from_the_runs_own_early_and_latest_views(exp):
    """Self mode over 3 epochs at 2 ranks: epoch 0 random; epoch e >= 1 planned from (embeddings at the stage's
    start, embeddings at epoch e's start), each the model of the run's own epoch checkpoint. Mutations caught
    (checked): planning from (early, early) (plans differ from (early, late) here, checked below), never
    refreshing the late view (epoch 2 planned from epoch 1's snapshot), the early view taken after the first
    epoch, or a plan at epoch 0."""
    from sclslt.data.shards import read_manifest
    from sclslt.eval.retrieval import embed_split
    from sclslt.runtime.rundir import load_run_model
    from sclslt.selection.planner import Planner
    from sclslt.selection.table import load_snapshot, table_from_snapshots

    d, cfg_path = exp
    run = d / "self"
    self_args = ("--stage2.enabled", "false", "--selection.mode", "self", "--stage1.epochs", "3")
    proc = launch(cfg_path, run, 29634, *self_args, "--train.max_steps", "0", "--checkpoint.every_epochs", "1")
    stdout = proc.stdout
    cfg = load_config(cfg_path, list(self_args[2:]))
    shards = resolve_shards_dir(cfg.data)
    keys = [s[0] for s in read_manifest(shards, "train")["samples"]]
    tok = load_tokenizer(run / "tokenizer")
    sel = run / "stage1" / "selection"
    assert not (sel / "plan_e0000.json").exists() and "planned" in stdout  # no late view yet: random batches
    trained = [r["keys"] for r in batch_log(run, "stage1")]
    assert trained[:6] == random_batches(cfg, "stage1", shards, 0)
    snaps = {tag: load_snapshot(sel / f"{tag}.safetensors") for tag in ("early", "epoch0001", "epoch0002")}
    for tag, ckpt in (("early", "epoch0000"), ("epoch0001", "epoch0001"), ("epoch0002", "epoch0002")):
        model, _, _ = load_run_model(run, run / "stage1" / "checkpoints", ckpt)
        want = embed_split(model, shards, "train", tok, "cpu", max_frames=cfg.data.max_frames)
        assert snaps[tag]["keys"] == keys and torch.allclose(snaps[tag]["video"], want["video"], atol=1e-5), tag
    planner = Planner(cfg.selection, cfg.stage1.global_batch, stage_seed(cfg, "stage1"))
    for epoch in (1, 2):
        table = table_from_snapshots(snaps["early"], snaps[f"epoch{epoch:04d}"])
        want = planner.plan_epoch(keys, epoch, cfg.stage1.epochs, lambda k: table)
        got = json.loads((sel / f"plan_e{epoch:04d}.json").read_text())
        assert got == want, epoch
        assert trained[6 * epoch : 6 * epoch + 6] == got, epoch
        stale = table_from_snapshots(snaps["early"], snaps["early" if epoch == 1 else "epoch0001"])
        assert planner.plan_epoch(keys, epoch, cfg.stage1.epochs, lambda k: stale) != got, epoch  # the check bites


def test_mpirun_launch_equals_one_process(exp):
    """`mpirun -np 2 python launch/train.py ...`: ranks found through mpi4py, same losses and weights."""
    import shutil

    d, cfg_path = exp
    run = d / "mpi"
    mpirun = Path(sys.executable).with_name("mpirun")
    mpirun = str(mpirun) if mpirun.exists() else shutil.which("mpirun")
    assert mpirun, "mpirun not found: the test extra installs the openmpi package"
    extra = ("--train.max_steps", "4", "--stage2.enabled", "false")
    env = {**TRAIN_ENV, "MASTER_PORT": "29651"}
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", str(WORLD)]
    for var in ("DS_ACCELERATOR", "SCLSLT_PLAIN_LOG", "OMP_NUM_THREADS", "MASTER_PORT", "PATH", "TRITON_INTERPRET"):
        if var in env:
            cmd += ["-x", var]
    proc = subprocess.run(
        cmd
        + [
            sys.executable,
            "launch/train.py",
            "--deepspeed",
            "configs/zero2.json",
            "--config",
            str(cfg_path),
            "--train.run_dir",
            str(run),
            *extra,
            *EVERY_STEP,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"world {WORLD} x cpu" in proc.stdout
    assert_stepwise(run, stepwise(cfg_path, run, *extra), "mpirun")


@pytest.mark.parametrize("world,micro,similarity", [(2, 2, "cico")])
def test_micro_batches_equal_one_process_over_the_whole_global_batch(exp, world, micro, similarity):
    """A rank's share in micro-batches of 2 clips (stage 1 by gradient caching, stage 2 by accumulation), at 2
    ranks (2 chunks each; CiCo's token-level columns), with BatchNorm over fixed groups of 2 clips: every step's
    logged loss, parameters and Adam moments are those of one plain-PyTorch process forwarding the whole
    global batch at once (the same groups), and the batches are the unchunked run's.
    Mutations caught: DeepSpeed's division by the accumulation steps left on (checked: the loss and
    parameters leave the reference at step 1); the pooled head's chunking is tested in one process
    (tests/unit/train/test_accumulate.py)."""
    d, cfg_path = exp
    run = d / f"micro{world}{similarity}"
    over = (
        "--model.batchnorm",
        "group 2",
        "--model.similarity",
        similarity,
        "--stage1.micro_batch",
        str(micro),
        "--stage2.micro_batch",
        str(micro),
    )
    launch(cfg_path, run, 29650 + world, *EVERY_STEP, *over, world=world)
    cfg = load_config(cfg_path)
    for name in STAGES:
        assert batch_log(run, name) == expected_log(cfg, name, resolve_shards_dir(cfg.data), STEPS), name
    assert_stepwise(run, stepwise(cfg_path, run, *over), f"world {world} micro {micro} {similarity}")

    # interrupted mid-epoch after 3 steps, resumed with each rank's whole share at once (another micro-batch):
    # the same batches and LR as the uninterrupted run, and every step, those after the resume included, one
    # process's step from the run's own state (trajectories are not compared: another chunking sums in
    # another order, and Adam amplifies that over steps)
    part = d / f"micro{world}{similarity}_resumed"
    launch(
        cfg_path,
        part,
        29660 + world,
        *EVERY_STEP,
        *over,
        "--train.max_steps",
        "3",
        "--stage2.enabled",
        "false",
        world=world,
    )
    whole = tuple(v if k < 4 or k % 2 == 0 else "0" for k, v in enumerate(over))
    proc = launch(cfg_path, part, 29670 + world, *EVERY_STEP, *whole, "--resume", world=world)
    assert "resumed at step 3" in proc.stdout
    for name in STAGES:
        assert batch_log(part, name) == batch_log(run, name), name
        assert [r["lr"] for r in metrics(part, name)] == pytest.approx([r["lr"] for r in metrics(run, name)], rel=1e-12)
    assert_stepwise(part, stepwise(cfg_path, part, *whole), f"world {world} resumed at another micro-batch")


def test_micro_batches_under_zero3_equal_one_process(exp):
    """ZeRO-3 (parameters partitioned: both passes of gradient caching gather them through the engine's forward)
    at 1 rank in micro-batches of 2 (4 chunks, pooled head, 'frozen' BatchNorm): stage 1's every step equals one
    process over the whole global batch, its batches are the unchunked run's, and its sampled steps are timed
    (a chunked step that misses a phase mark loses its timing row: checked)."""
    d, cfg_path = exp
    run = d / "micro_zero3"
    over = (
        "--model.batchnorm",
        "frozen",
        "--stage1.micro_batch",
        "2",
        "--stage2.enabled",
        "false",
        "--train.max_steps",
        "4",
        "--train.timing_every",
        "2",
    )
    launch(cfg_path, run, 29680, *EVERY_STEP, *over, ds="configs/zero3.json", world=1)
    cfg = load_config(cfg_path)
    assert batch_log(run, "stage1") == expected_log(cfg, "stage1", resolve_shards_dir(cfg.data), 4)
    with open(run / "stage1" / "timing.csv") as f:  # chunked steps are timed too (every phase marked)
        assert [int(float(r["step"])) for r in csv.DictReader(f)] == [2, 4]
    assert_stepwise(run, stepwise(cfg_path, run, *over), "zero3 world 1 micro 2")
