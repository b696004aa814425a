"""`sclslt evaluate` on the shared tiny run: the run's own evaluation reproduced, and any checkpoint on any split."""

import json


def test_sclslt_evaluate_reproduces_the_runs_evaluation_and_scores_any_checkpoint(tiny_run, capsys, tmp_path):
    """`sclslt evaluate --run RUN` decodes the checkpoint the run selected and gets exactly the run's own test
    metrics and hypotheses, leaving results.json as it was; `--split dev --checkpoint stage1` scores another
    checkpoint on another split (its own numbers, named in the report). Mutations caught (checked): stage 2's latest
    weights evaluated whatever checkpoint is asked for, a beam other than the run's."""
    from pathlib import Path

    from sclslt.cli import main

    run, hyps = tiny_run
    results = (run / "results.json").read_bytes()
    want = json.loads(results)
    assert main(["evaluate", "--run", str(run)]) == 0
    printed = capsys.readouterr().out
    report = Path(printed.split("wrote ")[-1].strip())
    got = json.loads(report.read_text())
    assert {r["key"]: r["hyp"] for r in got["hypotheses"]} == hyps
    assert got["model"] == want["model"] and got["trivial_baseline"] == want["trivial_baseline"]
    sel = want["selected_checkpoint"]
    assert got["checkpoint"] == f"{sel['stage']}/{sel['tag']}" and got["beam"] == want["beam"]
    assert (run / "results.json").read_bytes() == results and report.parent == run / "eval"
    # another checkpoint (stage 1's) on another split: what that checkpoint's weights decode in this process
    from sclslt.data.loader import Collate, ShardStream, make_loader
    from sclslt.eval.metrics import decode_loader
    from sclslt.runtime.rundir import checkpoint_tags, load_run_model

    ckpts = run / "stage1" / "checkpoints"
    tags = sorted(checkpoint_tags(ckpts))
    out = tmp_path / "dev_stage1.json"
    assert (
        main(
            [
                "evaluate",
                "--run",
                str(run),
                "--split",
                "dev",
                "--checkpoint",
                "stage1",
                "--tag",
                tags[0],
                "--out",
                str(out),
            ]
        )
        == 0
    )
    dev = json.loads(out.read_text())
    model, tok, cfg = load_run_model(run, ckpts, tags[0])
    from sclslt.data.corpus import resolve_shards_dir

    stream = ShardStream(resolve_shards_dir(cfg.data), "dev", cfg.eval.batch_size, max_frames=cfg.data.max_frames)
    rows = decode_loader(model.eval(), make_loader(stream, Collate(tok)), tok, "cpu", cfg.eval.beam, cfg.eval.max_len)
    assert dev["split"] == "dev" and dev["checkpoint"] == f"stage1/{tags[0]}"
    assert [(r["key"], r["hyp"]) for r in dev["hypotheses"]] == [(r["key"], r["hyp"]) for r in rows]
