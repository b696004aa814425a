"""The checkpoint-selection rule: the last stage's dev BLEU-4 picks the checkpoint that is evaluated.

A tiny run decodes dev after every stage-2 epoch; the recorded choice must be the best of the recorded
history under the stated rule, must survive rotation (keep=1) and a resume, and the test-split
hypotheses must be those of the selected checkpoint's weights, not of the last step's."""

import json
import subprocess
import sys

import yaml

from tests.helpers import ROOT, TRAIN_ENV


def _train(cfg_path, run, *extra):
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--config", str(cfg_path), "--train.run_dir", str(run), *extra],
        cwd=ROOT,
        env=TRAIN_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _metrics(run):
    import csv

    with open(run / "stage2" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_the_best_dev_checkpoint_is_kept_recorded_and_evaluated(tiny_cfg_dict, tmp_path):
    """With eval.patience 2 the stage stops after two dev decodings without a new best, and a resume trains
    nothing more. Mutations caught (checked): chrF before BLEU-4 in the rule (picks step 48, not 36), every new
    measurement taken as the best (the last checkpoint selected), patience ignored (all 8 epochs trained),
    the stop not derived from the restored history (the resume trains on)."""
    import torch

    from sclslt.data.corpus import resolve_shards_dir
    from sclslt.data.loader import Collate, ShardStream, make_loader
    from sclslt.eval.metrics import decode_loader
    from sclslt.runtime.rundir import load_run_model

    cfg = yaml.safe_load(yaml.safe_dump(tiny_cfg_dict))
    cfg["data"]["synthetic"]["n_train"] = 48
    cfg["stage1"]["enabled"] = False
    cfg["stage2"].update(epochs=8, lr=1e-2, global_batch=4)  # 12 steps per epoch; dev BLEU-4 moves (0 .. ~6)
    cfg["checkpoint"] = {"keep": 1}
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    patience = ("--eval.patience", "2")
    _train(cfg_path, run, "--train.max_steps", "48", *patience)  # stage 2 stops after 4 of 8 epochs
    proc = _train(cfg_path, run, "--resume", *patience)  # ... and goes on: the best so far is carried
    assert "dev BLEU-4" in proc.stdout
    sel = json.loads((run / "results.json").read_text())["selected_checkpoint"]
    hist = sel["history"]
    # every epoch's decoding, the resumed part included, until two decodings in a row found nothing better
    # than the best (eval.patience 2; spelled out: the first index i with no new best at i - 1 and i)
    steps = [h["step"] for h in hist]
    assert steps == list(range(12, 12 * len(hist) + 1, 12)) and len(hist) < 8
    key = lambda h: (h["dev_bleu4"], h["dev_chrf"] or 0.0, h["dev_rouge_l"])
    new_best = [i == 0 or key(h) > max(map(key, hist[:i])) for i, h in enumerate(hist)]
    assert not any(new_best[-2:]) and all(any(new_best[max(0, i - 1) : i + 1]) for i in range(len(hist) - 1))
    assert sel["stopped_early"]["at_step"] == steps[-1] and sel["stopped_early"]["patience"] == 2
    assert [int(r["step"]) for r in _metrics(run)][-1] == steps[-1]  # no step trained after the stop
    again = _train(cfg_path, run, "--resume", *patience)  # a resume after the stop trains nothing
    assert [int(r["step"]) for r in _metrics(run)][-1] == steps[-1] and "stopping early" not in again.stdout
    assert json.loads((run / "results.json").read_text())["selected_checkpoint"] == sel
    # the rule, spelled out: the highest dev BLEU-4, then chrF, then ROUGE-L; the earliest on full ties
    best = min(hist, key=lambda h: (-h["dev_bleu4"], -(h["dev_chrf"] or 0.0), -h["dev_rouge_l"], h["step"]))
    assert sel["tag"] == best["tag"] and sel["stage"] == "stage2" and "BLEU-4" in sel["rule"]
    assert best["tag"] != hist[-1]["tag"]  # the run's best is not its last: the rule decides
    ckpt = run / "stage2" / "checkpoints"
    assert (ckpt / sel["tag"]).is_dir()  # kept despite checkpoint.keep=1

    model, tok, rcfg = load_run_model(run, ckpt, sel["tag"])
    shards = resolve_shards_dir(rcfg.data)
    loader = make_loader(ShardStream(shards, "test", 8), Collate(tok), 0)
    rows = decode_loader(model, loader, tok, torch.device("cpu"), rcfg.eval.beam, rcfg.eval.max_len)
    got = [json.loads(line) for line in (run / "hypotheses.test.jsonl").read_text().splitlines()]
    assert [(r["key"], r["hyp"]) for r in rows] == [(r["key"], r["hyp"]) for r in got]
