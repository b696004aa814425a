"""`sclslt translate` on a tiny trained run: test clips written as PNG folders and videos translate to
the run's own test hypotheses; inputs are decoded as `sclslt shard` made the shards; errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sclslt.cli import main as cli_main
from sclslt.data.shards import read_manifest
from sclslt.eval.hub import TranslateError, load_clip
from sclslt.eval.translate import frame_spec, resolve_checkpoint
from tests.helpers import ROOT, TRAIN_ENV
from tests.helpers import frame_folder as _frame_folder
from tests.helpers import write_video as _write_video


def _cfg(run: Path):
    from sclslt.config import load_config

    return load_config(run / "config.yaml")


# ---------------------------------------------------------------------------------------------
# the translations equal the run's own test hypotheses


def test_decoded_inputs_equal_the_shard_frames(tiny_run, clips):
    spec = frame_spec(_cfg(tiny_run[0]))
    for c in clips:
        for path in (c["folder"], c["mkv"]):
            frames, n_src = load_clip(path, spec)
            assert n_src == c["frames"].shape[0]
            assert np.array_equal(frames, c["frames"]), path
    frames, _ = load_clip(clips[0]["mp4"], spec)
    assert frames.shape == clips[0]["frames"].shape
    assert np.abs(frames.astype(int) - clips[0]["frames"]).max() <= 8


def test_translate_command_reproduces_the_run_hypotheses(tiny_run, clips):
    run, hyps = tiny_run
    cfg = _cfg(run)
    inputs = [str(c[kind]) for c in clips for kind in ("folder", "mkv")] + [str(clips[0]["mp4"])]
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "sclslt.cli",
            "translate",
            "--run",
            str(run),
            *inputs,
            "--beam",
            str(cfg.eval.beam),
            "--device",
            "cpu",
            "--json",
        ],
        cwd=ROOT,
        env=TRAIN_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = [json.loads(line) for line in p.stdout.splitlines()]  # stdout: JSON lines only
    assert [o["input"] for o in out] == inputs
    results = json.loads((run / "results.json").read_text())
    sel = results.get("selected_checkpoint")
    want_tag = (
        (sel["tag"] if isinstance(sel, dict) else sel)
        if sel
        else (run / "stage2" / "checkpoints" / "latest").read_text().strip()
    )
    for o in out:
        assert o["checkpoint"] == f"stage2/{want_tag}"
        assert o["params"] > 1000 and o["load_s"] > 0 and o["latency_ms"] > 0 and o["beam"] == cfg.eval.beam
        assert o["device"] == "cpu"
    by_input = {o["input"]: o for o in out}
    for c in clips:
        for kind in ("folder", "mkv"):  # lossless inputs: exactly the run's hypothesis
            o = by_input[str(c[kind])]
            assert o["text"] == hyps[c["key"]], (kind, c["key"], o["text"], hyps[c["key"]])
            assert o["frames"] == o["source_frames"] == c["frames"].shape[0]
    mp4 = by_input[str(clips[0]["mp4"])]  # lossy colour conversion: it runs, same length
    assert mp4["frames"] == clips[0]["frames"].shape[0] and isinstance(mp4["text"], str)


def test_table_output_and_explicit_checkpoint(tiny_run, clips, capsys):
    run, hyps = tiny_run
    c = clips[0]
    sel = resolve_checkpoint(run)
    assert (
        cli_main(["translate", "--run", str(run), str(c["folder"]), "--checkpoint", str(sel.ckpt_dir / sel.tag)]) == 0
    )
    out = capsys.readouterr().out
    assert hyps[c["key"]] in out and "parameters" in out and "loaded in" in out and "model ms" in out
    assert cli_main(["translate", "--run", str(run), str(c["folder"]), "--checkpoint", "stage1", "--json"]) == 0
    o = json.loads(capsys.readouterr().out)
    assert o["checkpoint"].startswith("stage1/") and isinstance(o["text"], str)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_translate_on_cuda(tiny_run, clips, capsys):
    run, hyps = tiny_run
    assert cli_main(["translate", "--run", str(run), str(clips[0]["folder"]), "--device", "cuda", "--json"]) == 0
    o = json.loads(capsys.readouterr().out)
    assert o["device"].startswith("cuda") and o["text"] == hyps[clips[0]["key"]]


def test_console_script():
    exe = shutil.which("sclslt")
    if exe is None:
        pytest.skip("the sclslt console script is not installed (pip install -e .)")
    p = subprocess.run([exe, "translate", "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--checkpoint" in p.stdout and "INPUT" in p.stdout


# ---------------------------------------------------------------------------------------------
# decoding as `sclslt shard` does, for shards of real corpora


def test_inputs_are_decoded_like_the_shard_tool(tmp_path):
    """A frame folder and a video sharded with --size 24 --max-frames 9, then data.max_frames 5: the
    command's frames equal the shards' frames subsampled as evaluation does."""
    from sclslt.config import from_dict
    from sclslt.data import sharding as sv
    from sclslt.data.loader import subsample_frames
    from sclslt.data.shards import iter_shard

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (13, 30, 40, 3), dtype=np.uint8)  # 40 x 30, not square
    root = tmp_path / "corpus"
    _frame_folder(root / "a", frames)
    _write_video(root / "b.mkv", frames, "ffv1", "bgr0")
    (root / "manifest.csv").write_text("path,text,split\na,hallo welt,train\nb.mkv,guten abend,train\n")
    out = tmp_path / "shards"
    sv.shard_split("manifest", root, out, "train", size=24, max_frames=9, progress=False, log=lambda *a: None)
    man = read_manifest(out, "train")
    sharded = {s["key"]: s["frames"] for sh in man["shards"] for s in iter_shard(out / sh["name"])}
    cfg = from_dict({"data": {"corpus": "shards", "shards_dir": str(out), "max_frames": 5}})
    spec = frame_spec(cfg)
    assert (spec.size, spec.shape, spec.shard_max_frames, spec.max_frames) == (24, (24, 24), 9, 5)
    for key, path in (("a", root / "a"), ("b", root / "b.mkv")):
        got, n_src = load_clip(path, spec)
        assert n_src == 13 and got.shape == (5, 24, 24, 3)
        assert np.array_equal(got, subsample_frames(sharded[key], 5)), key
    (out / "train.json").unlink()
    with pytest.raises(TranslateError, match="--size"):
        frame_spec(cfg)
    assert frame_spec(cfg, size_override=32).shape == (32, 32)


# ---------------------------------------------------------------------------------------------
# which checkpoint, and the errors


def _fake_run(root: Path, stages: dict) -> Path:
    """A run layout with empty checkpoint files: {stage: (tags, latest)} (nothing is loaded)."""
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "tokenizer_config.json").write_text("{}")
    (root / "config.yaml").write_text("{}\n")
    for st, (tags, latest) in stages.items():
        d = root / st / "checkpoints"
        for t in tags:
            (d / t).mkdir(parents=True)
            (d / t / "mp_rank_00_model_states.pt").write_bytes(b"")
        if latest:
            (d / "latest").write_text(latest)
    return root


def test_checkpoint_choice(tmp_path):
    run = _fake_run(tmp_path / "r", {"stage1": (["s1a"], "s1a"), "stage2": (["s2a", "s2b"], "s2b")})
    assert resolve_checkpoint(run).label == "stage2/s2b"  # no results.json: latest
    (run / "results.json").write_text(json.dumps({"selected_checkpoint": {"stage": "stage2", "tag": "s2a"}}))
    assert resolve_checkpoint(run).label == "stage2/s2a"  # what the run selected
    assert resolve_checkpoint(run, "stage2").label == "stage2/s2a"
    (run / "results.json").write_text(json.dumps({"selected_checkpoint": "s2a"}))
    assert resolve_checkpoint(run).label == "stage2/s2a"
    assert resolve_checkpoint(run, "stage2", "s2b").label == "stage2/s2b"
    assert resolve_checkpoint(run, "stage1").label == "stage1/s1a"
    c = resolve_checkpoint(run, str(run / "stage2" / "checkpoints" / "s2b"))
    assert (c.ckpt_dir, c.tag) == (run / "stage2" / "checkpoints", "s2b")
    c = resolve_checkpoint(run, str(run / "stage1" / "checkpoints"))
    assert (c.ckpt_dir, c.tag) == (run / "stage1" / "checkpoints", "s1a")
    with pytest.raises(TranslateError, match="available in .*s2a"):
        resolve_checkpoint(run, "stage2", "nope")
    (run / "results.json").write_text(json.dumps({"selected_checkpoint": {"stage": "stage2", "tag": "gone"}}))
    with pytest.raises(TranslateError, match="gone"):
        resolve_checkpoint(run)
    only1 = _fake_run(tmp_path / "r1", {"stage1": (["x"], "x")})  # stage 2 disabled: stage 1
    assert resolve_checkpoint(only1).label == "stage1/x"
    with pytest.raises(TranslateError, match="no checkpoint"):
        resolve_checkpoint(only1, "stage2")


def _fails(argv, capsys, *needles):
    assert cli_main(["translate", *argv]) == 1
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, (n, err)
    return err


def test_errors_name_the_problem_and_the_file(tiny_run, clips, tmp_path, capsys):
    run, _ = tiny_run
    good = str(clips[0]["folder"])
    _fails(["--run", str(tmp_path / "nope"), good], capsys, "does not exist", "nope")
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    _fails(["--run", str(empty_run), good], capsys, "no config.yaml", str(empty_run))
    shutil.copy(run / "config.yaml", empty_run / "config.yaml")
    _fails(["--run", str(empty_run), good], capsys, "no tokenizer")
    shutil.copytree(run / "tokenizer", empty_run / "tokenizer")
    _fails(["--run", str(empty_run), good], capsys, "has no checkpoints")
    _fails(["--run", str(run), good, "--tag", "step99999999"], capsys, "step99999999", "available")
    _fails(["--run", str(run), good, "--checkpoint", str(tmp_path / "nockpt")], capsys, "nockpt")
    # inputs: checked before the model is loaded
    _fails(["--run", str(run), good, str(tmp_path / "missing.mp4")], capsys, "missing.mp4", "does not exist")
    (tmp_path / "no_frames").mkdir()
    (tmp_path / "no_frames" / "notes.txt").write_text("x")
    _fails(["--run", str(run), str(tmp_path / "no_frames")], capsys, "no_frames", "zero frames")
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(os.urandom(2048))
    _fails(["--run", str(run), good, str(bad)], capsys, "broken.mp4", "cannot be decoded")
    img = tmp_path / "one.png"
    Image.fromarray(clips[0]["frames"][0]).save(img)
    _fails(["--run", str(run), str(img)], capsys, "one.png", "single image")
    # an unreadable frame inside a folder is found when the clip is decoded
    broken = tmp_path / "broken_frames"
    shutil.copytree(clips[0]["folder"], broken)
    (broken / "images3.png").write_bytes(b"not a png")
    _fails(["--run", str(run), str(broken)], capsys, "images3.png", "unreadable frame")
    if not torch.cuda.is_available():
        _fails(["--run", str(run), good, "--device", "cuda"], capsys, "CUDA is not available")
    with pytest.raises(SystemExit) as e:  # usage errors: argparse, exit 2
        cli_main(["translate", good])
    assert e.value.code == 2
