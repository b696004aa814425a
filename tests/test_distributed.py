"""Two CPU ranks through the real `deepspeed` launcher (ZeRO-2, gloo) against one plain-PyTorch process.

The reference holds the whole global batch in one process: each rank's micro-batch is forwarded on
its own (BatchNorm statistics are per micro-batch, as on the ranks), the contrastive loss of every
rank's rows is taken against the concatenated columns, the translation loss is normalised by the
global token count, and torch.optim.AdamW steps with the same clipping and LR schedule. Losses of
every step and the parameters after both stages must agree: results may not depend on the number
of ranks, and ZeRO-2 releases with wrong gradients would fail here. The run is then repeated as
an interrupted run plus `--resume`, which must reproduce the same trajectory.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sclslt.config import load_config
from sclslt.data import Collate, resolve_shards_dir
from sclslt.engine import load_module_state, param_groups
from sclslt.losses import COLUMN_KEYS, contrastive_from_columns, pad_cat, translation_loss_sum
from sclslt.models import SLTModel
from sclslt.text import load_tokenizer
from sclslt.trainer import STAGES, forward, lr_lambda, seed_everything, set_trainable, train_stream

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
STEPS = 8           # crosses an epoch boundary (6 global batches per epoch)


@pytest.fixture(scope="module")
def exp(tiny_cfg_dict, tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    cfg = yaml.safe_load(yaml.safe_dump(tiny_cfg_dict))
    cfg["data"]["synthetic"]["n_train"] = 48
    cfg["train"]["max_steps"] = STEPS
    for st in ("stage1", "stage2"):
        # Adam's eps well above fp32 noise: elements whose true gradient is ~0 (a dead GELU unit) would
        # otherwise take +-lr steps decided by rounding noise, which differs with the summation order
        cfg[st].update(epochs=2, adam_eps=1e-5)
    cfg["checkpoint"] = {"every_steps": 3, "keep": 2}
    path = d / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return d, path


def launch(cfg_path: Path, run_dir: Path, port: int, *extra: str, ds: str = "configs/zero2.json"):
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed) if deepspeed.exists() else "deepspeed", "--num_accelerators", str(WORLD),
           "--master_port", str(port), "launch/train.py", "--deepspeed", ds,
           "--config", str(cfg_path), "--train.run_dir", str(run_dir), *extra]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "SCLSLT_PLAIN_LOG": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"launcher failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    # DeepSpeed's CPU backend leaves a 66 MiB /dev/shm buffer per rank unless the trainer removes it
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return proc


def metrics(run_dir: Path, stage: str) -> list[dict]:
    with open(run_dir / stage / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items() if k != "stage"} for r in csv.DictReader(f)]


def reference(cfg_path: Path, run_dir: Path, *overrides: str, dtype=torch.float32, worlds=None,
              optimizers: dict | None = None) -> tuple[dict, dict]:
    """Single process, plain torch.optim.AdamW, the same global batches: losses per stage and final params.

    `worlds(step)` gives the number of ranks whose micro-batches make global batch `step` (default
    WORLD): a job resumed at another world size takes its batches from the new rank split. `optimizers`,
    if given, receives each stage's (named parameters, AdamW) at the end."""
    torch.set_num_threads(1)        # the ranks' summation order (OMP_NUM_THREADS=1); Adam amplifies the rest
    cfg = load_config(cfg_path, ["--train.run_dir", str(run_dir), *overrides])
    tok = load_tokenizer(run_dir / "tokenizer")
    shards = resolve_shards_dir(cfg.data)
    collate = Collate(tok)
    seed_everything(cfg.train.seed)
    model = SLTModel(cfg.model, tok).to(dtype).train()
    worlds = worlds or (lambda step: WORLD)
    losses, params = {}, {}
    for i, name in enumerate(STAGES):
        st = getattr(cfg, name)
        if not st.enabled:
            continue
        if i > 0:
            # like the product, stage 2 starts from stage 1's checkpoint: each stage is compared from the
            # same start (max-pooling makes the gradient discontinuous, so 1e-5 differences at a stage's
            # end can move a later stage's trajectory by much more than rounding)
            model.load_state_dict(load_module_state(run_dir / STAGES[i - 1] / "checkpoints"))
        set_trainable(model, st)
        per_epoch = len(train_stream(cfg, name, shards, 0, WORLD))
        opt = torch.optim.AdamW(param_groups(model, st.weight_decay), lr=st.lr, betas=(0.9, 0.999), eps=st.adam_eps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(st.epochs * per_epoch, st.warmup_steps,
                                                                 st.min_lr_ratio))
        trainable = [p for p in model.parameters() if p.requires_grad]
        losses[name] = []
        for step in range(min(cfg.train.max_steps, st.epochs * per_epoch)):
            world = worlds(step)
            epoch, pos = divmod(step, per_epoch)
            streams = [train_stream(cfg, name, shards, r, world) for r in range(world)]
            for s in streams:
                s.set_epoch(epoch, skip=pos)
            batches = [collate(next(iter(s))) for s in streams]
            outs = [forward(model, b, st) for b in batches]
            loss = torch.zeros(())
            if st.translation_weight > 0:
                n_tok = sum(int((b.labels != -100).sum()) for b in batches)
                ce = sum(translation_loss_sum(o["logits"], b.labels, st.label_smoothing)
                         for o, b in zip(outs, batches)) / n_tok
                loss = loss + st.translation_weight * ce
            if st.contrastive_weight > 0:
                sim = cfg.model.similarity
                cat = torch.cat if sim == "pooled" else pad_cat
                cols = {k: cat([o[k] for o in outs]) for k in COLUMN_KEYS[sim]}
                cols["ids"] = torch.cat([b.sentence_ids for b in batches])
                b = len(batches[0])
                nce = sum(contrastive_from_columns(o, bt.sentence_ids, cols, r * b, sim, cfg.model.cico_tau)
                          for r, (o, bt) in enumerate(zip(outs, batches))) / world
                loss = loss + st.contrastive_weight * nce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.train.grad_clip)
            opt.step()
            sched.step()
            losses[name].append(loss.item())
        params[name] = {k: v.detach().clone() for k, v in model.named_parameters()}
        if optimizers is not None:
            optimizers[name] = (dict(model.named_parameters()), opt)
    return losses, params


def assert_params_close(ckpt_dir: Path, want: dict, what: str, tol: float = 1e-4) -> None:
    # tol: fp32 rounding amplified by Adam; a wrong gradient moves parameters by ~lr (3e-3) per step
    got = load_module_state(ckpt_dir)
    assert set(want) <= set(got), f"{what}: missing {set(want) - set(got)}"
    worst = max((got[k] - v).abs().max().item() for k, v in want.items())
    assert worst < tol, f"{what}: parameters differ by up to {worst:.2e}"


def test_two_ranks_equal_one_process_and_resume_reproduces(exp):
    d, cfg_path = exp
    run = d / "run"
    launch(cfg_path, run, 29611)
    ref_losses, ref_params = reference(cfg_path, run)
    for name in STAGES:
        got = [r["loss"] for r in metrics(run, name)]
        assert len(got) == STEPS == len(ref_losses[name])
        assert got == pytest.approx(ref_losses[name], rel=2e-5, abs=1e-6), name
        assert_params_close(run / name / "checkpoints", ref_params[name], name)
    assert ref_losses["stage1"][-1] < ref_losses["stage1"][0]      # it learns, it is not a constant

    # the same run, interrupted after 3 steps of stage 1, then resumed and extended
    part = d / "resumed"
    launch(cfg_path, part, 29612, "--train.max_steps", "3", "--stage2.enabled", "false")
    assert len(metrics(part, "stage1")) == 3 and not (part / "stage2").exists()
    proc = launch(cfg_path, part, 29613, "--resume")
    assert "resumed at step 3" in proc.stdout
    for name in STAGES:
        a, b = metrics(run, name), metrics(part, name)
        assert [r["step"] for r in b] == list(range(1, STEPS + 1))
        assert [r["lr"] for r in b] == pytest.approx([r["lr"] for r in a], rel=1e-12)   # no LR jump
        assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6), name
        want = {k: v for k, v in load_module_state(run / name / "checkpoints").items()}
        assert_params_close(part / name / "checkpoints", want, name + " (resumed)", tol=1e-6)

    # a finished run is not silently overwritten
    with pytest.raises(AssertionError, match="pass --resume"):
        launch(cfg_path, run, 29614)


def assert_optimizer_state_equal(universal: Path, named: dict, opt, what: str, tol: float = 1e-5) -> None:
    """DeepSpeed's universal form of a checkpoint (one file per parameter and state) against plain AdamW:
    parameters and both Adam moments, each relative to that quantity's largest value over the model
    (a lost or misplaced moment is off by ~1)."""
    for key, ref in (("fp32", lambda p: p.detach()), ("exp_avg", lambda p: opt.state[p]["exp_avg"]),
                     ("exp_avg_sq", lambda p: opt.state[p]["exp_avg_sq"])):
        want = {n: ref(p) for n, p in named.items() if p.requires_grad}
        scale = max(v.abs().max().item() for v in want.values())
        worst, at = 0.0, ""
        for n, v in want.items():
            got = torch.load(universal / "zero" / n / f"{key}.pt", weights_only=False)["param"].view_as(v)
            err = (got - v).abs().max().item() / scale
            worst, at = max((worst, at), (err, n))
        assert worst < tol, f"{what}: {key} differs by {worst:.2e} of its scale at {at}"


def test_resume_at_another_world_size_two_ranks_to_one_and_back(exp):
    """2 ranks write the checkpoint, 1 rank resumes it (DeepSpeed universal checkpoint: parameters, Adam
    moments, LR schedule re-partitioned), then 2 ranks resume the 1-rank checkpoint. At each change the
    parameters and Adam moments equal plain AdamW's whose global batches come from the rank split in
    force at each step; the losses and the LR follow the same trajectory: nothing of the optimizer state
    or the data position is lost."""
    d, cfg_path = exp
    run = d / "elastic"
    args = ("--stage2.enabled", "false", "--checkpoint.every_steps", "0")
    launch(cfg_path, run, 29650, *args, "--train.max_steps", "3")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "SCLSLT_PLAIN_LOG": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "launch/train.py", "--config", str(cfg_path), "--train.run_dir", str(run),
                          *args, "--train.max_steps", "5", "--resume"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert "written by 2 ranks, now 1" in one.stdout
    back = launch(cfg_path, run, 29651, *args, "--train.max_steps", str(STEPS), "--resume")
    assert "written by 1 ranks, now 2" in back.stdout

    worlds = lambda step: 1 if 3 <= step < 5 else WORLD        # noqa: E731
    universal = run / "stage1" / "checkpoints" / "universal"
    for steps in (3, 5):                 # the states each change started from: 2-rank, then 1-rank written
        opts = {}
        reference(cfg_path, run, "--stage2.enabled", "false", "--train.max_steps", str(steps), worlds=worlds,
                  optimizers=opts)
        assert_optimizer_state_equal(universal / f"step{steps:08d}", *opts["stage1"], f"after step {steps}")
    ref_losses, _ = reference(cfg_path, run, "--stage2.enabled", "false", worlds=worlds)
    got = metrics(run, "stage1")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    # rel 1e-3 for the steps after the changes: max-pooling amplifies 1e-6 parameter differences (above)
    # into 1e-4 loss differences on some paths; a lost data position or optimizer state moves far more
    assert [r["loss"] for r in got] == pytest.approx(ref_losses["stage1"], rel=1e-3)
    cfg = load_config(cfg_path, [])         # the LR follows the schedule across both changes, no jump
    per_epoch = cfg.data.synthetic.n_train // cfg.stage1.global_batch
    f = lr_lambda(cfg.stage1.epochs * per_epoch, cfg.stage1.warmup_steps, cfg.stage1.min_lr_ratio)
    assert [r["lr"] for r in got] == pytest.approx([cfg.stage1.lr * f(s) for s in range(1, STEPS + 1)], rel=1e-9)


@pytest.mark.parametrize("zero,similarity", [("1", "cico"), ("3", "pooled"), ("3_offload", "pooled")])
def test_other_zero_stages_equal_one_process(exp, zero, similarity):
    """ZeRO-1, ZeRO-3 (parameters partitioned; weights consolidated through zero_to_fp32 for the
    stage transfer; beam search with partitioned parameters) and ZeRO-3 with the optimizer offloaded to
    the host (DeepSpeed's CPU AdamW) give the same trajectories as plain PyTorch, with CiCo similarity
    (token features gathered with padding) on one of them."""
    d, cfg_path = exp
    run = d / f"zero{zero}"
    extra = ("--train.max_steps", "4", "--model.similarity", similarity)
    if zero.startswith("3"):
        # 17 dev clips: the ranks decode 2 and 1 batches, which partitioned parameters cannot follow
        # in lockstep (evaluation runs on a gathered plain copy instead)
        extra += ("--data.synthetic.n_dev", "17")
    launch(cfg_path, run, 29620 + len(zero) + int(zero[0]), *extra, ds=f"configs/zero{zero}.json")
    ref_losses, ref_params = reference(cfg_path, run, *extra)
    for name in STAGES:
        assert [r["loss"] for r in metrics(run, name)] == pytest.approx(ref_losses[name], rel=2e-5), name
        assert_params_close(run / name / "checkpoints", ref_params[name], f"zero{zero} {name}")
    assert (run / "results.json").is_file()


def test_pair_selection_over_two_ranks_equals_one_planner(exp):
    """Reference run with epoch checkpoints -> 2-rank table export -> 2-rank PS run whose global
    batches equal the single-process planner's on the same pools; then the self-referenced mode."""
    import json

    from sclslt.data import rank_pool_keys
    from sclslt.reference import embed_split, load_run_model
    from sclslt.selection import Planner, load_table
    from sclslt.shards import read_manifest
    from sclslt.trainer import stage_seed

    d, cfg_path = exp
    ref = d / "ref"
    launch(cfg_path, ref, 29631, "--stage2.enabled", "false", "--train.max_steps", "0",
           "--checkpoint.every_epochs", "1")
    tags = sorted(p.name for p in (ref / "stage1" / "checkpoints").iterdir() if p.name.startswith("epoch"))
    assert tags == ["epoch0000", "epoch0001", "epoch0002"]

    table_path = d / "ref.safetensors"
    deepspeed = Path(sys.executable).with_name("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    subprocess.run([str(deepspeed) if deepspeed.exists() else "deepspeed", "--num_accelerators", str(WORLD),
                    "--master_port", "29632", "tools/export_reference.py", "--run", str(ref), "--early", "epoch0000",
                    "--late", "epoch0002", "--out", str(table_path)], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    table = load_table(table_path)
    cfg = load_config(cfg_path, ["--train.run_dir", str(ref)])
    shards = resolve_shards_dir(cfg.data)
    manifest = read_manifest(shards, "train")
    assert table.keys == [s[0] for s in manifest["samples"]]
    # the exported late view is what the late checkpoint's model gives in one process
    model, tok, _ = load_run_model(ref, ref / "stage1" / "checkpoints", "epoch0002")
    one = embed_split(model, shards, "train", tok, "cpu")
    assert torch.allclose(table.v1, one["video"].double(), atol=1e-5)
    assert torch.allclose(table.t1, one["text"].double(), atol=1e-5)
    assert not torch.allclose(table.v0, table.v1)

    ps = d / "ps"
    launch(cfg_path, ps, 29633, "--stage2.enabled", "false", "--train.max_steps", "0", "--selection.mode", "ps",
           "--selection.table", str(table_path), "--selection.chunk", "2")
    ps_cfg = load_config(cfg_path, ["--selection.mode", "ps", "--selection.table", str(table_path),
                                    "--selection.chunk", "2"])
    micro = ps_cfg.stage1.global_batch // WORLD
    for epoch in range(ps_cfg.stage1.epochs):
        pools = {r: table.rows(rank_pool_keys(manifest, stage_seed(ps_cfg, "stage1"), epoch, r, WORLD))
                 for r in range(WORLD)}
        want = Planner(ps_cfg.selection, table, micro, WORLD, stage_seed(ps_cfg, "stage1")).plan_epoch_local(
            pools, epoch, ps_cfg.stage1.epochs, manifest["num_samples"] // ps_cfg.stage1.global_batch)
        for r in range(WORLD):
            got = json.loads((ps / "stage1" / "selection" / f"plan_e{epoch:04d}_r{r:05d}.json").read_text())
            assert got == [[table.keys[i] for i in mb] for mb in want[r]], (epoch, r)
    assert [r["step"] for r in metrics(ps, "stage1")] == list(range(1, 13))

    # interrupted mid-epoch (step 3 of 6) and resumed: the same planned batches, the same losses
    part = d / "ps_resumed"
    ps_args = ("--stage2.enabled", "false", "--selection.mode", "ps", "--selection.table", str(table_path),
               "--selection.chunk", "2")
    launch(cfg_path, part, 29635, *ps_args, "--train.max_steps", "3")
    launch(cfg_path, part, 29636, *ps_args, "--train.max_steps", "0", "--resume")
    for f in sorted((ps / "stage1" / "selection").glob("plan_*.json")):
        assert (part / "stage1" / "selection" / f.name).read_text() == f.read_text(), f.name
    assert [r["loss"] for r in metrics(part, "stage1")] == pytest.approx([r["loss"] for r in metrics(ps, "stage1")],
                                                                          rel=1e-6)

    selfrun = d / "self"
    proc = launch(cfg_path, selfrun, 29634, "--stage2.enabled", "false", "--train.max_steps", "0",
                  "--selection.mode", "self")
    sel = selfrun / "stage1" / "selection"
    assert (sel / "early.safetensors").is_file() and (sel / "epoch0001.safetensors").is_file()
    assert not (sel / "plan_e0000_r00000.json").exists()          # no late view yet: random batches
    assert (sel / "plan_e0001_r00001.json").is_file() and "planned" in proc.stdout


def test_mpirun_launch_equals_one_process(exp):
    """`mpirun -np 2 python launch/train.py ...`: ranks found through mpi4py, same losses and weights."""
    import shutil
    d, cfg_path = exp
    run = d / "mpi"
    mpirun = Path(sys.executable).with_name("mpirun")
    mpirun = str(mpirun) if mpirun.exists() else shutil.which("mpirun")
    assert mpirun, "mpirun not found: the test extra installs the openmpi package"
    extra = ("--train.max_steps", "4", "--stage2.enabled", "false")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "SCLSLT_PLAIN_LOG": "1", "OMP_NUM_THREADS": "1",
           "MASTER_PORT": "29651"}
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", str(WORLD)]
    for var in ("DS_ACCELERATOR", "SCLSLT_PLAIN_LOG", "OMP_NUM_THREADS", "MASTER_PORT", "PATH", "TRITON_INTERPRET"):
        if var in env:
            cmd += ["-x", var]
    proc = subprocess.run(cmd + [sys.executable, "launch/train.py", "--deepspeed", "configs/zero2.json",
                                 "--config", str(cfg_path), "--train.run_dir", str(run), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"world {WORLD} x cpu" in proc.stdout
    ref_losses, ref_params = reference(cfg_path, run, *extra)
    assert [r["loss"] for r in metrics(run, "stage1")] == pytest.approx(ref_losses["stage1"], rel=2e-5)
    assert_params_close(run / "stage1" / "checkpoints", ref_params["stage1"], "mpirun")
