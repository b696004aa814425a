"""The experiment that shows whether Pair Selection works: random vs ps vs self on the synthetic corpus.

For every seed: (1) a random-batch run with epoch checkpoints, which is both the `random` arm and
the reference run; (2) a reference table exported from its checkpoints `epoch0000` and
`epoch{interval}`; (3) the `ps` arm with that table; (4) the `self` arm (no reference run). All
arms then fine-tune (stage 2) and are evaluated identically. Reported per arm, mean and spread over
seeds: dev video->text R@1 after stage 1 (a retrieved clip with the query's sentence counts) and
test BLEU-4 after stage 2. The trajectory analysis of the seed-0 reference run is added.

  python tools/ps_experiment.py --seeds 0 1 2 --out runs/ps_experiment

Writes <out>/results.json and a Markdown table to --table (default benchmarks/results/ps_experiment.md),
with the command that made it. Runs are resumed/skipped when their results.json exists.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "SCLSLT_PLAIN_LOG": "1"})
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): see {log}")


def launcher(args, port: int) -> list[str]:
    ds = Path(sys.executable).with_name("deepspeed")
    cmd = [str(ds) if ds.exists() else "deepspeed", "--master_port", str(port)]
    if args.nproc:
        cmd += ["--num_accelerators", str(args.nproc)]
    return cmd


def train(args, run: Path, seed: int, port: int, *extra: str) -> dict:
    if not (run / "results.json").is_file():
        sh(launcher(args, port) + ["launch/train.py", "--deepspeed", args.deepspeed, "--config", str(args.config),
                                   "--train.seed", str(seed), "--train.run_dir", str(run), *extra],
           run.with_suffix(".log"))
    return json.loads((run / "results.json").read_text())


def near_duplicate(a: str, b: str) -> bool:
    wa, wb = a.split(), b.split()
    return len(wa) == len(wb) and sum(x != y for x, y in zip(wa, wb)) == 1


def batch_analysis(run: Path, table_path: Path) -> list[dict]:
    """Per epoch of a planned run: mean pairwise delta of its batches, and how many member pairs are
    exact / near-duplicate sentences (one word apart), against random batches of the same samples."""
    import itertools

    import torch

    from sclslt.selection.planner import load_table
    table = load_table(table_path)
    from sclslt.config import load_config
    from sclslt.data.loader import resolve_shards_dir
    from sclslt.data.shards import manifest_rows, read_manifest
    cfg = load_config(run / "config.yaml")
    texts = {r.key: r.text for r in manifest_rows(read_manifest(resolve_shards_dir(cfg.data), "train"))}
    out = []
    for plan_file in sorted((run / "stage1" / "selection").glob("plan_e*_r00000.json")):
        epoch = int(plan_file.name[6:10])
        ranks = sorted((run / "stage1" / "selection").glob(f"plan_e{epoch:04d}_r*.json"))
        plans = [json.loads(f.read_text()) for f in ranks]
        batches = [sum((p[b] for p in plans), []) for b in range(len(plans[0]))]
        gen = torch.Generator().manual_seed(epoch)
        flat = [k for b in batches for k in b]
        perm = [flat[i] for i in torch.randperm(len(flat), generator=gen).tolist()]
        shuffled = [perm[i:i + len(batches[0])] for i in range(0, len(perm), len(batches[0]))]

        def stats(bs):
            d, exact, near, pairs = 0.0, 0, 0, 0
            for b in bs:
                rows = table.rows(b)
                v1, v0, t1, t0 = table.v1[rows], table.v0[rows], table.t1[rows], table.t0[rows]
                delta = v1 @ t1.t() - v0 @ t0.t()
                d += float(delta.sum() - delta.diagonal().sum())
                for x, y in itertools.combinations(b, 2):
                    exact += texts[x] == texts[y]
                    near += near_duplicate(texts[x], texts[y])
                    pairs += 1
            n_neg = sum(len(b) * (len(b) - 1) for b in bs)
            return {"mean_delta": d / n_neg, "exact_dup_pairs": exact / pairs, "near_dup_pairs": near / pairs}
        out.append({"epoch": epoch, "planned": stats(batches), "random_same_samples": stats(shuffled)})
    return out


def summary(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "ps_synthetic.yaml")
    p.add_argument("--deepspeed", default="configs/zero2.json")
    p.add_argument("--interval", type=int, default=2, help="reference table: checkpoints epoch0000 and epoch<interval>")
    p.add_argument("--nproc", type=int, default=0, help="ranks per run (0: what the launcher finds)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "ps_experiment")
    p.add_argument("--table", type=Path, default=ROOT / "benchmarks" / "results" / "ps_experiment.md")
    args = p.parse_args(argv)
    args.out = args.out.resolve()

    per_arm: dict[str, list[dict]] = {"random": [], "ps": [], "self": []}
    for i, seed in enumerate(args.seeds):
        base = args.out / f"seed{seed}"
        port = 29700 + 10 * i
        per_arm["random"].append(train(args, base / "random", seed, port))
        table = base / "reference.safetensors"
        if not table.is_file():
            sh(launcher(args, port + 1) + ["tools/export_reference.py", "--run", str(base / "random"),
                                           "--early", "epoch0000", "--late", f"epoch{args.interval:04d}",
                                           "--out", str(table)], base / "export.log")
        per_arm["ps"].append(train(args, base / "ps", seed, port + 2, "--selection.mode", "ps",
                                   "--selection.table", str(table)))
        per_arm["self"].append(train(args, base / "self", seed, port + 3, "--selection.mode", "self",
                                     "--selection.self_interval", str(args.interval)))

    traj = args.out / f"seed{args.seeds[0]}" / "trajectories"
    report = None
    if (ROOT / "tools" / "trajectories.py").is_file():
        if not (traj / "report.json").is_file():
            sh([sys.executable, "tools/trajectories.py", "--run", str(args.out / f"seed{args.seeds[0]}" / "random"),
                "--out", str(traj)], args.out / "trajectories.log")
        report = json.loads((traj / "report.json").read_text())

    rows = {arm: {"dev_v2t_r1": summary([r["retrieval"]["stage1"]["v2t_r1"] for r in res]),
                  "dev_t2v_r1": summary([r["retrieval"]["stage1"]["t2v_r1"] for r in res]),
                  "test_bleu4": summary([r["model"]["bleu4"] for r in res]),
                  "test_rouge_l": summary([r["model"]["rouge_l"] for r in res])}
            for arm, res in per_arm.items()}
    first = args.out / f"seed{args.seeds[0]}"
    analysis = batch_analysis(first / "ps", first / "reference.safetensors")
    cmd = "python tools/ps_experiment.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    out = {"command": cmd, "seeds": args.seeds, "config": str(args.config), "arms": rows, "trajectories": report,
           "ps_batches_seed0": analysis,
           "bleu_signature": per_arm["random"][0]["model"]["bleu_signature"]}
    (args.out / "results.json").write_text(json.dumps(out, indent=2))

    lines = ["# Pair Selection on the synthetic corpus", "", f"Command: `{cmd}` (config `{args.config.name}`, "
             f"seeds {args.seeds}, reference interval {args.interval} epochs).", "",
             "| arm | dev v->t R@1 | dev t->v R@1 | test BLEU-4 | test ROUGE-L |", "|---|---|---|---|---|"]
    for arm, r in rows.items():
        lines.append(f"| {arm} | " + " | ".join(f"{r[k]['mean']:.2f} ± {r[k]['std']:.2f}" for k in
                                                 ("dev_v2t_r1", "dev_t2v_r1", "test_bleu4", "test_rouge_l")) + " |")
    lines += ["", f"BLEU: sacrebleu `{out['bleu_signature']}`; mean ± sample std over seeds."]
    if report:
        lines += ["", "Trajectory analysis of the seed-{} reference run: ".format(args.seeds[0]) + ", ".join(
            f"{k} {v:.1%}" for k, v in report.get("fractions", {}).items())]
    lines += ["", f"Batches the ps arm planned (seed {args.seeds[0]}) vs random batches of the same samples:", "",
              "| epoch | mean delta (ps / random) | exact-duplicate pairs | near-duplicate pairs (1 word) |",
              "|---|---|---|---|"]
    for a in analysis:
        p_, r_ = a["planned"], a["random_same_samples"]
        lines.append(f"| {a['epoch']} | {p_['mean_delta']:.4f} / {r_['mean_delta']:.4f} | "
                     f"{p_['exact_dup_pairs']:.2%} / {r_['exact_dup_pairs']:.2%} | "
                     f"{p_['near_dup_pairs']:.2%} / {r_['near_dup_pairs']:.2%} |")
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
