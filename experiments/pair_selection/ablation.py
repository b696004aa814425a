"""What Pair Selection adds: every ablation arm on one test bed, paired seeds, one table.

An arm is a training recipe (ARMS below); every arm runs the same seeds, and seed s of every arm
shares the corpus, the initialisation and the stage-2 recipe, so arms are compared seed by seed:
the table gives each arm's mean and the mean paired difference to the baseline arm `random`
(id-masked random batches) with its 95% confidence interval (Student t over seeds). A difference
whose interval excludes 0 is resolved; one whose interval includes 0 is not, whatever its mean.

Reference runs and tables come from the arms themselves: `random` (and `random_cico` for CiCo)
saves a checkpoint every epoch and is the reference run; a table (early tag, late tag) is exported
from it once per seed (`sclslt reference`). Runs are resumed/skipped when their results.json
exists, so the table grows arm by arm (run from the checkout's root):

  python -m experiments.pair_selection.ablation --arms random --seeds 0 1 2 3 4 5   # the baseline, and its spread
  python -m experiments.pair_selection.ablation --arms ps self --seeds 0 1 2 3 4 5   # one command per ablation
  python -m experiments.pair_selection.ablation --report --seeds 0 1 2 3 4 5         # the table from what exists

The table is written to --table (Markdown) with a JSON beside it: per arm and seed the metrics,
the paired differences, the seeds needed for 80% power at a 2-point gap (from the measured paired
spread), the corpus's partner statistics (experiments/pair_selection/partners.py) and, for the first
seed, how many paraphrase / identical / one-meaning-apart pairs the planned batches hold against random
batches.

What a table is built from fits in one JSONL per study (`--save-runs FILE`: a line for the study, then one
line per run with its metrics and, for the first seed, the analyses of its batches, plans and
trajectories); `--runs FILE --report` rebuilds the table from it without the run folders:

  python -m experiments.pair_selection.ablation \
      --runs experiments/pair_selection/results/false_negatives_tb1.runs.jsonl \
      --report --table experiments/pair_selection/results/false_negatives_tb1.md

A hand-written header above the table's `Command:` line (an existing --table's) is kept when it is rebuilt.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Arm:
    """One recipe: stage-1 overrides, and the table (reference arm, early tag, late tag, scoring) it plans with."""

    help: str
    args: tuple[str, ...] = ()
    table: tuple[str, str, str, str] | None = None
    reference: bool = False  # saves epoch checkpoints: other arms' reference run
    pretrained: str = ""  # "encoders" (backbone + mBART + tokenizer, as a real recipe) or
    # "vlp" (the whole pretraining run's stage 1): see `pretrained`
    baseline: str = "random"  # the arm it is compared with, seed by seed
    also: tuple[str, ...] = ()  # secondary comparisons (the false-negative study: does it help Pair Selection?)


PS = ("--selection.mode", "ps")
CICO = ("--model.similarity", "cico")
ARMS: dict[str, Arm] = {
    "random": Arm("random batches, same-sentence columns masked (our baseline; the reference run)", reference=True),
    "random_nomask": Arm(
        "random batches, no id mask (the paper's GFSLT-VLP baseline)", ("--stage1.mask_same_sentence", "false")
    ),
    "ps": Arm(
        "Pair Selection, log schedule, table epoch 0 -> 2 (medium interval)",
        PS,
        ("random", "epoch0000", "epoch0002", "pooled"),
        also=("random_textmask",),
    ),
    "self": Arm(
        "self mode: the job's own embeddings, refreshed every 2 epochs",
        ("--selection.mode", "self", "--selection.self_interval", "2"),
    ),
    **{
        f"ps_{s}": Arm(
            f"Pair Selection, {s} schedule (table 0 -> 2)",
            PS + ("--selection.schedule", s),
            ("random", "epoch0000", "epoch0002", "pooled"),
        )
        for s in ("easy", "hard", "linear", "sqrt")
    },
    "ps_short": Arm(
        "Pair Selection, table epoch 0 -> 1 (short interval)", PS, ("random", "epoch0000", "epoch0001", "pooled")
    ),
    "ps_long": Arm(
        "Pair Selection, table epoch 0 -> 4 (long interval)", PS, ("random", "epoch0000", "epoch0004", "pooled")
    ),
    "ps_early2": Arm(
        "Pair Selection, table epoch 2 -> 4 (a trained early view)", PS, ("random", "epoch0002", "epoch0004", "pooled")
    ),
    "random_pre": Arm(
        "random batches from pretrained encoders (the pretrained reference run)", pretrained="encoders", reference=True
    ),
    "ps_pre": Arm(
        "Pair Selection from pretrained encoders, table epoch 0 -> 2 of the pretrained reference run",
        PS,
        ("random_pre", "epoch0000", "epoch0002", "pooled"),
        pretrained="encoders",
        baseline="random_pre",
    ),
    "ps_pre_early2": Arm(
        "Pair Selection from pretrained encoders, table epoch 2 -> 4",
        PS,
        ("random_pre", "epoch0002", "epoch0004", "pooled"),
        pretrained="encoders",
        baseline="random_pre",
    ),
    "random_vlp": Arm(
        "random batches from a whole pretrained VLP model (heads included: epoch 0 already orders "
        "pairs; the VLP reference run)",
        pretrained="vlp",
        reference=True,
    ),
    "ps_vlp": Arm(
        "Pair Selection from the pretrained VLP model, table epoch 0 -> 2 of the VLP reference run",
        PS,
        ("random_vlp", "epoch0000", "epoch0002", "pooled"),
        pretrained="vlp",
        baseline="random_vlp",
    ),
    "random_cico": Arm("random batches, CiCo similarity (the CiCo reference run)", CICO, reference=True),
    "ps_cico": Arm(
        "Pair Selection with CiCo training, pooled-scored table of the CiCo reference run (0 -> 2)",
        CICO + PS,
        ("random_cico", "epoch0000", "epoch0002", "pooled"),
        baseline="random_cico",
    ),
    "ps_cico_table": Arm(
        "Pair Selection with CiCo training, CiCo-scored table of the CiCo reference run (0 -> 2)",
        CICO + PS,
        ("random_cico", "epoch0000", "epoch0002", "cico"),
        baseline="random_cico",
    ),
}
# the false-negative study (experiments/pair_selection/results/false_negatives_plan.md): the methods that keep false
# negatives out. Their
# thresholds are chosen on dev with the tuning seeds (TUNING_SEEDS; `--tune-report`) from these candidates,
# then fixed in CHOSEN for both test beds.
PS_TABLE = ("random", "epoch0000", "epoch0002", "pooled")
SEP_Q = (0.005, 0.01, 0.02)
CLOSE_T = {"cosine": (0.8, 0.9, 0.95), "jaccard": (0.5, 0.6, 0.7)}
SOFT_W = (0.1, 0.3)
TUNING_SEEDS = (100, 101, 102)


def textmask(kind: str, t: float) -> tuple[str, ...]:
    return ("--stage1.mask_close_text", str(t), "--stage1.mask_close_text_kind", kind)


TUNING: dict[str, Arm] = {
    **{
        f"tune_sep{q}": Arm(
            f"tuning: Pair Selection, pairs in the top {q} at both checkpoints kept apart",
            PS + ("--selection.separate_close", str(q)),
            PS_TABLE,
        )
        for q in SEP_Q
    },
    **{
        f"tune_{k}{t}": Arm(f"tuning: random batches, close texts ({k} >= {t}) masked", textmask(k, t))
        for k, ts in CLOSE_T.items()
        for t in ts
    },
    **{
        f"tune_{k}{t}_soft{w}": Arm(
            f"tuning: random batches, close texts ({k} >= {t}) as positives of weight {w}",
            textmask(k, t) + ("--stage1.soft_close_text", str(w)),
        )
        for k, ts in CLOSE_T.items()
        for t in ts
        for w in SOFT_W
    },
}
ARMS.update(TUNING)

# the values the plan's rule chose on dev (experiments/pair_selection/results/false_negatives_tuning.md), then
# fixed for both
# test beds: separate_close q*, the text mask's (kind k*, threshold t*), the soft weight w*
CHOSEN = {"separate_close": 0.02, "mask_close_text": ("jaccard", 0.6), "soft_close_text": 0.3}


def method_arms(c: dict) -> dict[str, Arm]:
    """The plan's arms (false_negatives_plan.md) at the chosen values."""
    sep = ("--selection.separate_close", str(c["separate_close"]))
    mask = textmask(*c["mask_close_text"])
    nosafe = ("--stage1.mask_same_sentence", "false", "--selection.allow_same_sentence", "true")
    return {
        "ps_sep": Arm(
            f"Pair Selection, pairs in the top {c['separate_close']} at both checkpoints kept apart",
            PS + sep,
            PS_TABLE,
            also=("ps", "random_textmask"),
        ),
        "random_textmask": Arm(f"random batches, close texts ({mask[3]} >= {mask[1]}) masked", mask),
        "random_textsoft": Arm(
            f"random batches, close texts as positives of weight {c['soft_close_text']}",
            mask + ("--stage1.soft_close_text", str(c["soft_close_text"])),
        ),
        "ps_textmask": Arm("Pair Selection + the close-text mask", PS + mask, PS_TABLE, also=("ps", "random_textmask")),
        "ps_sep_textmask": Arm(
            "Pair Selection with separation + the close-text mask",
            PS + sep + mask,
            PS_TABLE,
            also=("ps", "random_textmask"),
        ),
        "ps_nosafe": Arm(
            "Pair Selection with both safeguards off (no id mask, identical sentences may share a "
            "batch): the paper's setting",
            PS + nosafe,
            PS_TABLE,
            baseline="random_nomask",
        ),
        "random_cico_split": Arm(
            "random batches, CiCo with one term per direction (i2t for video->text, t2i for text->video)",
            CICO + ("--model.cico_directions", "split"),
            baseline="random_cico",
        ),
    }


if all(v is not None for v in CHOSEN.values()):
    ARMS.update(method_arms(CHOSEN))
FN_ARMS = {
    "random",
    "random_nomask",
    "ps",
    *TUNING,
    *method_arms({"separate_close": 0, "mask_close_text": ("jaccard", 0), "soft_close_text": 0}),
}
METRICS = {
    "dev_v2t_r1": ("retrieval", "stage1", "v2t_r1"),
    "dev_t2v_r1": ("retrieval", "stage1", "t2v_r1"),
    "test_bleu4": ("model", "bleu4"),
    "test_rouge_l": ("model", "rouge_l"),
}
# two-sided 95% Student t quantiles by degrees of freedom (published tables); between the last rows the
# quantile is interpolated linearly in 1 / df (exact to 1e-3), towards the normal's 1.96 as df grows
T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    17: 2.110,
    18: 2.101,
    19: 2.093,
    20: 2.086,
    21: 2.080,
    22: 2.074,
    23: 2.069,
    24: 2.064,
    25: 2.060,
    26: 2.056,
    27: 2.052,
    28: 2.048,
    29: 2.045,
    30: 2.042,
    40: 2.021,
    60: 2.000,
    120: 1.980,
}


def t975(df: int) -> float:
    if df < 1:
        return math.inf
    if df in T975:
        return T975[df]
    lo = max(k for k in T975 if k < df)
    hi = min((k for k in T975 if k > df), default=math.inf)
    t_hi = T975.get(hi, 1.959964)
    w = (1 / lo - 1 / df) / (1 / lo - (0 if hi == math.inf else 1 / hi))
    return T975[lo] + w * (t_hi - T975[lo])


def paired(diffs: list[float]) -> dict:
    """Mean of paired differences and its 95% confidence interval."""
    n = len(diffs)
    mean = statistics.mean(diffs) if diffs else math.nan
    sd = statistics.stdev(diffs) if n > 1 else math.nan
    half = t975(n - 1) * sd / math.sqrt(n) if n > 1 else math.inf
    return {
        "n": n,
        "mean": mean,
        "sd": sd,
        "ci95": [mean - half, mean + half],
        "resolved": n > 1 and (mean - half > 0 or mean + half < 0),
        "values": diffs,
    }


def seeds_for_gap(sd: float, gap: float = 2.0) -> int | None:
    """Paired seeds for 80% power to find a true `gap` at 5% (normal approximation), given the paired sd."""
    if not sd or math.isnan(sd):
        return None
    return max(2, math.ceil(((1.96 + 0.8416) * sd / gap) ** 2))


def metric(res: dict, path: tuple[str, ...]) -> float:
    for k in path:
        res = res[k]
    return float(res)


# ---------------------------------------------------------------------------------------------
# running


def sh(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        proc = subprocess.run(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "SCLSLT_PLAIN_LOG": "1"}
        )
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): see {log}")


def launcher(args, port: int) -> list[str]:
    ds = Path(sys.executable).with_name("deepspeed")
    return [str(ds) if ds.exists() else "deepspeed", "--master_port", str(port), "--num_accelerators", str(args.nproc)]


def table_for(args, seed: int, spec: tuple[str, str, str, str], port: int) -> Path:
    ref, early, late, score = spec
    out = args.out / f"seed{seed}" / "tables" / f"{ref}.{early}.{late}.{score}.safetensors"
    if not out.is_file():
        run_arm(args, ref, seed, port)
        sh(
            launcher(args, port + 1)
            + [
                "--module",
                "sclslt.cli",
                "reference",
                "--run",
                str(args.out / f"seed{seed}" / ref),
                "--early",
                early,
                "--late",
                late,
                "--score",
                score,
                "--out",
                str(out),
            ],
            out.with_suffix(".log"),
        )
    return out


_PRETRAIN_LOCK = threading.Lock()


def pretrained(args, kind: str) -> list[str]:
    """The overrides of a pretrained start, made once for all seeds (a fixed artifact, as ImageNet/mBART
    weights are): --pretrain-config (the test bed's language, clips it never trains on) trained with seed
    1000; "encoders": its backbone, text encoder and decoder exported by `sclslt export --encoders`;
    "vlp": its whole stage-1 model (model.init_from), contrastive heads included."""
    out = args.out / "pretrained"
    with _PRETRAIN_LOCK:
        if not (out / "export" / "export.json").is_file():
            run = out / "run"
            if not (run / "results.json").is_file():
                sh(
                    launcher(args, 30990)
                    + [
                        "launch/train.py",
                        "--deepspeed",
                        args.deepspeed,
                        "--config",
                        str(args.pretrain_config),
                        "--train.seed",
                        "1000",
                        "--train.run_dir",
                        str(run),
                    ],
                    out / "run.log",
                )
            sh(
                [
                    sys.executable,
                    "-m",
                    "sclslt.cli",
                    "export",
                    "--encoders",
                    "--run",
                    str(run),
                    "--out",
                    str(out / "export"),
                ],
                out / "export.log",
            )
    if kind == "vlp":
        return [
            "--model.init_from",
            str(out / "run" / "stage1" / "checkpoints"),
            "--model.tokenizer",
            str(out / "run" / "tokenizer"),
            "--model.trim_vocab",
            "false",
        ]
    e = out / "export"
    return [
        "--model.backbone",
        str(e / "backbone"),
        "--model.mbart",
        str(e / "mbart"),
        "--model.tokenizer",
        str(e / "tokenizer"),
        "--model.trim_vocab",
        "false",
    ]


def run_arm(args, name: str, seed: int, port: int) -> dict:
    arm, run = ARMS[name], args.out / f"seed{seed}" / name
    if run.is_dir() and not (run / "results.json").is_file():
        import shutil  # an interrupted run (the table is resumable, a run is not)

        shutil.rmtree(run)
    if not (run / "results.json").is_file():
        extra = list(arm.args) + (pretrained(args, arm.pretrained) if arm.pretrained else [])
        if arm.table:
            extra += ["--selection.table", str(table_for(args, seed, arm.table, port + 2))]
        if arm.reference:
            extra += ["--checkpoint.every_epochs", "1"]
        print(f"seed {seed}: {name}", flush=True)
        sh(
            launcher(args, port)
            + [
                "launch/train.py",
                "--deepspeed",
                args.deepspeed,
                "--config",
                str(args.config),
                "--train.seed",
                str(seed),
                "--train.run_dir",
                str(run),
                *extra,
            ],
            run.parent / f"{name}.log",
        )  # not with_suffix: arm names hold dots (tune_cosine0.8)
    return json.loads((run / "results.json").read_text())


def run_seeds(args) -> None:
    """Every requested arm for every seed; --jobs seeds at a time (a seed's arms in order: tables first)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i_seed):
        i, seed = i_seed
        for j, name in enumerate(args.arms):
            run_arm(args, name, seed, args.port + 100 * (i % 10) + 5 * j)

    if args.jobs > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(one, enumerate(args.seeds)))


# ---------------------------------------------------------------------------------------------
# analysis


def corpus_truth(cfg) -> tuple[dict[str, str], dict[str, int] | None]:
    """key -> text of the training split, and key -> meaning where the corpus knows meanings (synthetic)."""
    from sclslt.data.corpus import resolve_shards_dir
    from sclslt.data.shards import manifest_rows, read_manifest

    texts = {r.key: r.text for r in manifest_rows(read_manifest(resolve_shards_dir(cfg.data), "train"))}
    if cfg.data.corpus != "synthetic":
        return texts, None
    from sclslt.data.synthetic import SyntheticCorpus

    corpus = SyntheticCorpus(cfg.data.synthetic)
    return texts, {k: corpus.meaning_of_key(k) for k in texts}


def batch_pairs(run: Path) -> list[dict]:
    """Per epoch of a planned run: the share of member pairs that are identical texts, paraphrases (same
    meaning, other text) and near texts of another meaning, against random batches of the same samples."""
    import itertools
    import random

    from sclslt.config import load_config

    texts, meaning = corpus_truth(load_config(run / "config.yaml"))
    sets = {k: frozenset(t.split()) for k, t in texts.items()}

    def kinds(batches):
        c = {"pairs": 0, "identical": 0, "paraphrase": 0, "near_other_meaning": 0}
        for b in batches:
            for x, y in itertools.combinations(b, 2):
                c["pairs"] += 1
                if texts[x] == texts[y]:
                    c["identical"] += 1
                elif meaning and meaning[x] == meaning[y]:
                    c["paraphrase"] += 1
                elif len(sets[x] & sets[y]) / len(sets[x] | sets[y]) >= 0.6:
                    c["near_other_meaning"] += 1
        return {k: v / c["pairs"] for k, v in c.items() if k != "pairs"}

    out = []
    sel = run / "stage1" / "selection"
    for first in sorted(sel.glob("plan_e????.json")) or sorted(sel.glob("plan_e*_r00000.json")):
        epoch = int(first.name[6:10])
        if first.name == f"plan_e{epoch:04d}.json":  # the epoch's global batches
            batches = json.loads(first.read_text())
        else:  # runs from before the world-size-invariant loader: one file per rank
            plans = [json.loads(f.read_text()) for f in sorted(sel.glob(f"plan_e{epoch:04d}_r*.json"))]
            batches = [sum((p[b] for p in plans), []) for b in range(len(plans[0]))]
        flat = [k for b in batches for k in b]
        random.Random(epoch).shuffle(flat)
        size = len(batches[0])
        shuffled = [flat[i : i + size] for i in range(0, len(flat), size)]
        out.append({"epoch": epoch, "planned": kinds(batches), "random_same_samples": kinds(shuffled)})
    return out


def pr(detected: int, hits: int, true: int) -> dict:
    """Precision and recall of a false-negative detection: `hits` of `detected` pairs are among `true`."""
    return {
        "detected": detected,
        "true": true,
        "precision": hits / detected if detected else None,
        "recall": hits / true if true else None,
    }


def separated_pairs(run: Path, cfg) -> tuple:
    """(N, N) bool over the run's table rows: the pairs `selection.separate_close` keeps apart (both
    checkpoints' symmetric similarity at or above the planner's thresholds: `separation.close_thresholds`),
    and the table's keys."""
    from sclslt.data.loader import rng_seed
    from sclslt.runtime.context import stage_seed
    from sclslt.selection.separation import close_thresholds, threshold_keys
    from sclslt.selection.table import load_table

    path = Path(cfg.selection.table)
    if not path.is_file():  # a run folder moved (not where it ran): the table beside the seed's runs
        path = run.parent / "tables" / path.name
    t = load_table(path)
    sample = threshold_keys(t.keys, rng_seed(stage_seed(cfg, "stage1"), 8))
    th = close_thresholds(t, sample, cfg.selection.separate_close)
    s0 = (t.v0 @ t.t0.t() + t.t0 @ t.v0.t()) / 2
    s1 = (t.v1 @ t.t1.t() + t.t1 @ t.v1.t()) / 2
    close = (s0 >= th[0]) & (s1 >= th[1]) & (t.sentence_ids[:, None] != t.sentence_ids[None, :])
    return close, t.keys


def false_negative_stats(run: Path) -> dict:
    """What an arm's first-seed run did to false negatives, against the corpus's ground truth:
    - batches: the share of paraphrase / identical pairs among the member pairs of the batches it trained on;
    - loss: columns per row removed from the InfoNCE denominator (identical sentences, close texts) or made
      soft positives, and the fraction of the denominator that is; paraphrase pairs among them (precision) and
      the share of the batches' paraphrase pairs they caught (recall);
    - detection over all training clip pairs: precision and recall of the text mask's close pairs and of
      the planner's separated pairs, a true pair being two different sentences of one meaning."""
    import torch

    from sclslt.config import load_config
    from sclslt.data.corpus import resolve_shards_dir
    from sclslt.data.shards import manifest_rows, read_manifest
    from sclslt.model.close_text import CLOSE_FILE, CloseSentences

    cfg = load_config(run / "config.yaml")
    texts, meaning = corpus_truth(cfg)
    keys = sorted(texts)
    col = {k: i for i, k in enumerate(keys)}
    ids = {r.key: r.sentence_id for r in manifest_rows(read_manifest(resolve_shards_dir(cfg.data), "train"))}
    sid = torch.tensor([ids[k] for k in keys])  # the loss's ids (data.lowercase as the run had it)
    mean = torch.tensor([meaning[k] for k in keys])
    same = sid[:, None] == sid[None, :]
    para = (mean[:, None] == mean[None, :]) & ~same
    st = cfg.stage1
    f = run / "stage1" / "selection" / CLOSE_FILE
    close = CloseSentences.load(f).mask(sid, sid) if f.is_file() else torch.zeros_like(same)
    off = ~torch.eye(len(keys), dtype=torch.bool)
    out = {
        "text_mask_detection": pr(int((close & off).sum()), int((close & para).sum()), int(para.sum()))
        if f.is_file()
        else None
    }
    if cfg.selection.separate_close > 0:
        sep, tkeys = separated_pairs(run, cfg)
        r = torch.tensor([col[k] for k in tkeys])
        p = para[r][:, r]
        out["separation_detection"] = pr(int(sep.sum()), int((sep & p).sum()), int(p.sum()))
    batches = [json.loads(ln)["keys"] for ln in (run / "stage1" / "batches.jsonl").read_text().splitlines()]
    c = dict(pairs=0, paraphrase=0, identical=0, id_masked=0, close=0, close_paraphrase=0, rows=0)
    for b in batches:
        i = torch.tensor([col[k] for k in b])
        bo = off[: len(b), : len(b)]
        sb, pb, cb = same[i][:, i] & bo, para[i][:, i], close[i][:, i] & bo
        c["pairs"] += int(bo.sum())
        c["paraphrase"] += int(pb.sum())
        c["identical"] += int(sb.sum())
        c["id_masked"] += int(sb.sum()) if st.mask_same_sentence else 0
        c["close"] += int((cb & ~sb).sum())
        c["close_paraphrase"] += int((cb & pb).sum())
        c["rows"] += len(b)
    out["batches"] = {
        "paraphrase_share": c["paraphrase"] / c["pairs"],
        "identical_share": c["identical"] / c["pairs"],
        "id_masked_per_row": c["id_masked"] / c["rows"],
        "close_per_row": c["close"] / c["rows"],
        "close_kind": "soft positives" if st.soft_close_text else "masked",
        "denominator_removed": (c["id_masked"] + (0 if st.soft_close_text else c["close"])) / c["pairs"],
        "close_in_batch": pr(c["close"], c["close_paraphrase"], c["paraphrase"]),
    }
    return out


def compare(per_seed: dict[int, dict], ref: dict[int, dict]) -> dict[str, dict]:
    """Paired differences to another arm over the seeds both have: each metric, and the mean of the two dev
    R@1 (the plan's decision reads it beside test BLEU-4)."""
    common = [s for s in sorted(per_seed) if s in ref]
    out = {m: paired([metric(per_seed[s], p) - metric(ref[s], p) for s in common]) for m, p in METRICS.items()}
    out["dev_r1"] = paired([dev_r1(per_seed[s]) - dev_r1(ref[s]) for s in common])
    return out


def verdict(diffs: dict[str, dict]) -> str:
    """The plan's rule (false_negatives_plan.md, "Decision rule") on one comparison: "beats" when the 95%
    interval of test BLEU-4 or of the mean dev R@1 lies above 0 and no primary metric's lies below 0;
    "worse" when one of them or the mean dev R@1 lies below 0 and none above; "mixed" when both; else
    "unresolved"."""
    below = [m for m in (*METRICS, "dev_r1") if diffs[m]["n"] > 1 and diffs[m]["ci95"][1] < 0]
    above = [m for m in ("test_bleu4", "dev_r1") if diffs[m]["n"] > 1 and diffs[m]["ci95"][0] > 0]
    if above:
        return "mixed" if set(below) - {"dev_r1"} else "beats"
    return "worse" if below else "unresolved"


def arm_rows(results: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per arm (from its per-seed results.json): each metric's mean over seeds, the paired differences to its
    baseline (`vs_random`) and to its secondary comparisons (`vs_also`), and the plan's verdict on each."""
    rows = {}
    for name, per_seed in results.items():
        row = {"help": ARMS[name].help, "seeds": sorted(per_seed), "baseline": ARMS[name].baseline}
        for m, path in METRICS.items():
            vals = [metric(per_seed[s], path) for s in sorted(per_seed)]
            row[m] = {
                "mean": statistics.mean(vals),
                "sd": statistics.stdev(vals) if len(vals) > 1 else math.nan,
                "values": vals,
            }
        others = (ARMS[name].baseline, *ARMS[name].also) if name != "random" else ()
        comps = {o: compare(per_seed, results[o]) for o in others if results.get(o)}
        for m in METRICS:
            for o, c in comps.items():
                if o == ARMS[name].baseline:
                    row[m]["vs_random"] = c[m]
                else:
                    row[m].setdefault("vs_also", {})[o] = c[m]
        row["decision"] = {o: {"dev_r1": c["dev_r1"], "verdict": verdict(c)} for o, c in comps.items()}
        rows[name] = row
    return rows


def collect(args) -> dict:
    """What the report is built from, read from the run folders under --out: the study (config, seeds, the
    corpus's partner statistics) and one record per run (its metrics; for the first seed also the analyses
    of its batches and plans, its false negatives and its trajectories). `--save-runs` writes it as JSONL."""
    first = args.out / f"seed{args.seeds[0]}"
    if not (first / "random" / "results.json").is_file():
        raise SystemExit(f"no results of the baseline arm `random` under {first}: run it first")
    from experiments.pair_selection.partners import partner_stats
    from sclslt.config import load_config

    texts, meaning = corpus_truth(load_config(first / "random" / "config.yaml"))
    keys = sorted(texts)
    partners = partner_stats([texts[k] for k in keys], [meaning[k] for k in keys] if meaning else None)
    traj = trajectories(first)
    runs = []
    for seed in args.seeds:
        machine = args.out / f"seed{seed}" / "machine.json"
        for name in ARMS:
            run = args.out / f"seed{seed}" / name
            if not (run / "results.json").is_file():
                continue
            res = json.loads((run / "results.json").read_text())
            rec = {
                "seed": seed,
                "arm": name,
                "metrics": {m: metric(res, path) for m, path in METRICS.items()},
                "bleu_signature": res["model"]["bleu_signature"],
            }
            if machine.is_file():
                rec["machine"] = {k: v for k, v in json.loads(machine.read_text()).items() if k != "arms"}
            if seed == args.seeds[0]:
                if ARMS[name].table:
                    rec["batch_pairs"] = batch_pairs(run)
                if meaning and name in FN_ARMS and (run / "stage1" / "batches.jsonl").is_file():
                    rec["false_negatives"] = false_negative_stats(run)
                own = {t: r for t, r in traj.items() if (TRAJECTORIES[t] or (t,))[0] == name}
                if own:
                    rec["trajectories"] = own
            runs.append(rec)
    return {"study": {"config": str(args.config), "seeds": list(args.seeds), "partners": partners}, "runs": runs}


def save_runs(path: Path, study: dict) -> None:
    """The study as JSONL: its own line first, then one line per run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=False) + "\n" for r in [study["study"], *study["runs"]]))


def load_runs(path: Path) -> dict:
    lines = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
    return {"study": lines[0], "runs": lines[1:]}


def as_results(rec: dict) -> dict:
    """A run's record in the shape of its results.json, as far as the report reads it."""
    res: dict = {"model": {"bleu_signature": rec["bleu_signature"]}}
    for m, path in METRICS.items():
        d = res
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = rec["metrics"][m]
    return res


def report(study: dict, seeds: list[int]) -> dict:
    """The table's numbers from a study (`collect` or `load_runs`) over `seeds`, arms in ARMS order."""
    recs = {(r["seed"], r["arm"]): r for r in study["runs"]}
    results: dict[str, dict[int, dict]] = {}
    for name in ARMS:
        for seed in seeds:
            if (seed, name) in recs:
                results.setdefault(name, {})[seed] = as_results(recs[(seed, name)])
    if "random" not in results:
        raise SystemExit("no results of the baseline arm `random`: run it first")
    base = results["random"]
    rows = arm_rows(results)
    if study["study"].get("verdicts") is False:  # a study made before the plan's decision rule (the first ablation)
        for r in rows.values():
            r.pop("decision", None)
    power = {}
    for m in METRICS:
        sds = [r[m]["vs_random"]["sd"] for r in rows.values() if "vs_random" in r[m] and r[m]["vs_random"]["n"] > 1]
        sd = statistics.median(sds) if sds else math.sqrt(2) * rows["random"][m]["sd"]
        power[m] = {
            "paired_sd": sd,
            "seeds_for_2_points": seeds_for_gap(sd),
            "from": "median paired sd over arms" if sds else "sqrt(2) x the random arm's sd",
        }
    first = {r["arm"]: r for r in study["runs"] if r["seed"] == seeds[0]}
    batches = {arm: first[arm]["batch_pairs"] for arm in ARMS if "batch_pairs" in first.get(arm, {})} or None
    fn = {arm: first[arm]["false_negatives"] for arm in rows if "false_negatives" in first.get(arm, {})}
    traj = {t: r for rec in first.values() for t, r in rec.get("trajectories", {}).items()}
    out = {
        "config": study["study"]["config"],
        "seeds": seeds,
        "arms": rows,
        "power": power,
        "partners": study["study"]["partners"],
        "ps_batches_first_seed": batches,
        "trajectories": {t: traj[t] for t in TRAJECTORIES if t in traj},
    }
    if fn:
        out["false_negatives_first_seed"] = fn
    out["bleu_signature"] = base[sorted(base)[0]]["model"]["bleu_signature"]
    return out


TRAJECTORIES = {"random": None, "random_from_epoch2": ("random", 2), "random_pre": None, "random_vlp": None}


def trajectories(seed_dir: Path) -> dict:
    """The paper's trajectory analysis (experiments/pair_selection/trajectories.py, 1024 clips) of the first seed's
    reference runs:
    from scratch, from scratch with a trained early view (epoch 2), from pretrained encoders and from a
    pretrained VLP model; class shares, and where identical texts and paraphrases fall."""
    out = {}
    for name, spec in TRAJECTORIES.items():
        ref, first = spec or (name, 0)
        run = seed_dir / ref
        if not (run / "results.json").is_file():
            continue
        dest = run / "stage1" / ("trajectories" if not first else f"trajectories_from_epoch{first}")
        if not (dest / "report.json").is_file() and not (run / "stage1" / "checkpoints").is_dir():
            continue  # a run kept without its checkpoints: nothing to embed
        if not (dest / "report.json").is_file():
            tags = sorted(p.name for p in (run / "stage1" / "checkpoints").glob("epoch*"))
            tags = [t for t in tags if int(t[5:]) >= first]
            sh(
                [
                    sys.executable,
                    "-m",
                    "experiments.pair_selection.trajectories",
                    "--run",
                    str(run),
                    "--sample",
                    "1024",
                    "--tags",
                    *tags,
                    "--out",
                    str(dest),
                ],
                run.parent / f"{run.name}.{dest.name}.log",
            )
        r = json.loads((dest / "report.json").read_text())
        out[name] = {k: r.get(k) for k in ("tags", "fractions", "same_sentence", "paraphrase")}
    return out


def cell(d: dict | None) -> str:
    """A paired difference and its 95% interval."""
    return "" if not d else f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"


def fmt(v: dict) -> str:
    d = v.get("vs_random")
    s = f"{v['mean']:.2f}"
    if d and d["n"] > 1:
        lo, hi = d["ci95"]
        s += f" ({d['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]{' *' if d['resolved'] else ''})"
    return s


def markdown(out: dict, cmd: str) -> str:
    lines = [
        "# What Pair Selection adds: ablations on the paraphrase test bed",
        "",
        f"Command: `{cmd}` (config `{Path(out['config']).name}`, seeds {out['seeds']}).",
        "",
        "Each cell: mean over seeds (mean paired difference to the arm's baseline [95% CI]; * = the "
        "interval excludes 0).",
        "",
        "| arm | vs | seeds | dev v->t R@1 | dev t->v R@1 | test BLEU-4 | test ROUGE-L |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in out["arms"].items():
        vs = "" if name == "random" else r.get("baseline", "random")
        lines.append(f"| {name} | {vs} | {len(r['seeds'])} | " + " | ".join(fmt(r[m]) for m in METRICS) + " |")
    also = [(n, o) for n, r in out["arms"].items() for o in r[next(iter(METRICS))].get("vs_also", {})]
    if also:
        lines += [
            "",
            "Secondary comparisons (does the addition help?): mean paired difference [95% CI].",
            "",
            "| arm | vs | " + " | ".join(METRICS) + " |",
            "|---|---|" + "---|" * len(METRICS),
        ]
        for n, o in also:
            lines.append(
                f"| {n} | {o} | "
                + " | ".join(fmt({**out["arms"][n][m], "vs_random": out["arms"][n][m]["vs_also"][o]}) for m in METRICS)
                + " |"
            )
    decided = [(n, o, d) for n, r in out["arms"].items() for o, d in r.get("decision", {}).items()]
    if decided:
        lines += [
            "",
            "The plan's decision rule on each comparison (false_negatives_plan.md): `beats` when the 95% "
            "interval of test BLEU-4 or of the mean dev R@1 lies above 0 and no primary metric's lies below 0; "
            "`worse` when one of them or the mean dev R@1 lies below 0 and none above; `mixed` when both; "
            "else `unresolved`.",
            "",
            "| arm | vs | mean dev R@1 | verdict |",
            "|---|---|---|---|",
        ]
        lines += [f"| {n} | {o} | {cell(d['dev_r1'])} | {d['verdict']} |" for n, o, d in decided]
    lines += ["", "Arms:", ""] + [f"- `{n}`: {r['help']}" for n, r in out["arms"].items()]
    lines += [
        "",
        "Seeds needed for 80% power at a 2-point paired gap (5% two-sided): "
        + ", ".join(
            f"{m} {p['seeds_for_2_points']} (paired sd {p['paired_sd']:.2f}, {p['from']})"
            for m, p in out["power"].items()
        ),
        "",
        f"BLEU: sacrebleu `{out['bleu_signature']}`.",
        "",
    ]
    pc = out["partners"]["per_clip"]
    lines += ["Partners per training clip: " + ", ".join(f"{k} {v:.2f}" for k, v in pc.items()) + "."]
    for ref, r in out.get("trajectories", {}).items():
        pp, ss = r.get("paraphrase") or {}, r["same_sentence"]
        lines += [
            "",
            f"Trajectories of `{ref}` (seed {out['seeds'][0]}, {r['tags'][0]} -> {r['tags'][-1]}): "
            + ", ".join(f"{k} {v:.1%}" for k, v in r["fractions"].items())
            + f". Identical-text pairs: {ss['hh_fraction'] or 0:.2%} "
            f"of H->H vs {ss['negatives_fraction']:.2%} of negatives"
            + (
                f"; paraphrase pairs: {pp['hh_fraction'] or 0:.2%} of H->H vs {pp['negatives_fraction']:.2%} of "
                f"negatives ({pp['counts_by_class']})."
                if pp
                else "."
            ),
        ]
    if out.get("false_negatives_first_seed"):
        lines += [
            "",
            f"False negatives (seed {out['seeds'][0]}; ground truth: two different sentences of one meaning). "
            "Batches: paraphrase and identical pairs as a share of the member pairs trained on; per row: "
            "columns the id mask removes and close-text columns (masked or soft positives); the share of "
            "the denominator removed; precision / recall of the close columns against the batches' "
            "paraphrase pairs, and of the detection over all training clip pairs (text mask; the "
            "planner's separated pairs).",
            "",
            "| arm | paraphrase | identical | id-masked / row | close / row | denominator removed | "
            "in-batch P / R | text mask P / R | separation P / R |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        f = lambda d: (
            ""
            if not d
            else (
                f"{d['precision']:.2f} / {d['recall']:.2f}"
                if d["precision"] is not None
                else f"- / {d['recall'] or 0:.2f}"
            )
        )
        for arm, r in out["false_negatives_first_seed"].items():
            b = r["batches"]
            lines.append(
                f"| {arm} | {b['paraphrase_share']:.2%} | {b['identical_share']:.2%} | "
                f"{b['id_masked_per_row']:.2f} | {b['close_per_row']:.2f} ({b['close_kind']}) | "
                f"{b['denominator_removed']:.2%} | {f(b['close_in_batch'])} | {f(r['text_mask_detection'])} | "
                f"{f(r.get('separation_detection'))} |"
            )
    if out["ps_batches_first_seed"]:
        lines += [
            "",
            f"Pairs inside planned batches (seed {out['seeds'][0]}) / inside random batches of the same "
            "samples, as a share of all member pairs:",
            "",
            "| arm | epoch | identical | paraphrase | near, other meaning |",
            "|---|---|---|---|---|",
        ]
        for arm, epochs in out["ps_batches_first_seed"].items():
            for e in epochs:
                p, r = e["planned"], e["random_same_samples"]
                lines.append(
                    f"| {arm} | {e['epoch']} | "
                    + " | ".join(f"{p[k]:.2%} / {r[k]:.2%}" for k in ("identical", "paraphrase", "near_other_meaning"))
                    + " |"
                )
    return "\n".join(lines) + "\n"


def dev_r1(res: dict) -> float:
    """The tuning criterion: (dev v->t R@1 + dev t->v R@1) / 2 of stage 1."""
    return (metric(res, METRICS["dev_v2t_r1"]) + metric(res, METRICS["dev_t2v_r1"])) / 2


def close_pairs(run: Path) -> int:
    """Close sentence pairs a run's text mask found (both orders; 0 without one)."""
    from sclslt.model.close_text import CLOSE_FILE, CloseSentences

    f = run / "stage1" / "selection" / CLOSE_FILE
    return len(CloseSentences.load(f).codes) if f.is_file() else 0


def choose(cands: dict[str, float], size: dict[str, float], tie: float = 0.1) -> str:
    """The plan's rule: the highest mean dev R@1; candidates within `tie` of it go to the smallest
    intervention (`size`: q, the number of close pairs masked, w)."""
    best = max(cands.values())
    return min((n for n, v in cands.items() if v >= best - tie), key=lambda n: (size[n], n))


def tune_report(args) -> dict:
    """Dev-only table of the tuning arms over the tuning seeds, and the plan's choice in each group
    (separation q; close-text kind and threshold; soft weight at the chosen kind and threshold). Test
    metrics are neither read nor printed."""

    def mean_dev(name):
        runs = [args.out / f"seed{s}" / name / "results.json" for s in args.seeds]
        vals = [dev_r1(json.loads(f.read_text())) for f in runs if f.is_file()]
        return statistics.mean(vals) if len(vals) == len(runs) else None

    first = args.out / f"seed{args.seeds[0]}"
    groups = {
        "separate_close": {f"tune_sep{q}": q for q in SEP_Q},
        "mask_close_text": {
            f"tune_{k}{t}": close_pairs(first / f"tune_{k}{t}") for k, ts in CLOSE_T.items() for t in ts
        },
    }
    out = {
        "seeds": args.seeds,
        "criterion": "mean over seeds of (dev v->t R@1 + dev t->v R@1) / 2",
        "random": mean_dev("random"),
        "groups": {},
    }
    for group, size in list(groups.items()) + [("soft_close_text", None)]:
        if size is None:  # the soft weights at the chosen text mask
            chosen = out["groups"].get("mask_close_text", {}).get("chosen")
            if not chosen:
                continue
            size = {f"{chosen}_soft{w}": w for w in SOFT_W}
        means = {n: mean_dev(n) for n in size}
        done = {n: v for n, v in means.items() if v is not None}
        out["groups"][group] = {
            "dev_r1": means,
            "size": size,
            "chosen": choose(done, size) if len(done) == len(size) else None,
        }
    return out


def tune_markdown(out: dict, cmd: str) -> str:
    lines = [
        "# False negatives: choosing the thresholds on dev (tuning seeds only; test metrics not read)",
        "",
        f"Command: `{cmd}` (seeds {out['seeds']}).",
        "",
        f"Criterion: {out['criterion']}; the plan's rule "
        "(false_negatives_plan.md): the highest, ties within 0.1 to the smallest intervention.",
        "",
        f"`random` (id mask only): {out['random']:.2f}" if out["random"] is not None else "`random`: not run",
        "",
        "| group | arm | size | dev R@1 (mean of both directions) | chosen |",
        "|---|---|---|---|---|",
    ]
    for group, g in out["groups"].items():
        for n, v in g["dev_r1"].items():
            lines.append(
                f"| {group} | {n} | {g['size'][n]:g} | {'' if v is None else f'{v:.2f}'} | "
                f"{'**yes**' if g['chosen'] == n else ''} |"
            )
    return "\n".join(lines) + "\n"


# the false-negative study: the methods the README may recommend (each against random batches), and the Pair
# Selection arms that are also compared with the mask alone (their `also`). ps_nosafe and random_cico_split are the
# paper-comparable arms: reported by the same rule, not recommended.
METHODS = ("ps_sep", "random_textmask", "random_textsoft", "ps_textmask", "ps_sep_textmask")
REPORTED = ("ps_nosafe", "random_cico_split")
PS_ARMS = tuple(a for a, arm in ARMS.items() if "random_textmask" in arm.also)
PLAN_SEEDS = 10  # paired seeds per comparison and test bed
INCOMPLETE = "not measured on every test bed"


def recommend(beds: dict[str, dict]) -> dict:
    """The plan's recommendation over test beds (each bed: a `--report` JSON). A method is recommended only
    if it beats random batches on every bed, with the plan's PLAN_SEEDS paired seeds on each; one that beats
    on some beds only is named and not recommended; if the text mask is recommended and no Pair Selection arm
    beats the mask alone on every bed, the answer is "masking alone". A comparison missing on a bed, or with
    fewer seeds, leaves the answer open."""

    def verdicts(arm: str, vs: str) -> dict[str, str]:
        out = {}
        for bed, rep in beds.items():
            d = rep["arms"].get(arm, {}).get("decision", {}).get(vs)
            n = d["dev_r1"]["n"] if d else 0
            out[bed] = d["verdict"] if d and n >= PLAN_SEEDS else f"{n} of {PLAN_SEEDS} seeds"
        return out

    def status(v: dict[str, str]) -> str:
        vals = list(v.values())
        if any(x.endswith(" seeds") for x in vals):
            return INCOMPLETE
        if all(x == "beats" for x in vals):
            return "beats on every test bed"
        return "beats on some test beds only" if "beats" in vals else "does not beat its baseline"

    rows = {}
    for arm in METHODS + REPORTED:
        v = verdicts(arm, ARMS[arm].baseline)
        rows[arm] = {
            "vs": ARMS[arm].baseline,
            "verdicts": v,
            "status": status(v),
            "also": {o: verdicts(arm, o) for o in ARMS[arm].also},
        }
    over_mask = {a: status(verdicts(a, "random_textmask")) for a in PS_ARMS}
    winners = [a for a in METHODS if rows[a]["status"] == "beats on every test bed"]
    partial = [a for a in METHODS if rows[a]["status"] == "beats on some test beds only"]
    open_ = [a for a in METHODS if rows[a]["status"] == INCOMPLETE]
    if "random_textmask" in winners:
        open_ += [f"{a} vs random_textmask" for a, st in over_mask.items() if st == INCOMPLETE]
    if open_:
        answer = "not decided: " + ", ".join(open_) + f" not measured with {PLAN_SEEDS} seeds on every test bed"
    elif "random_textmask" in winners and not any(st == "beats on every test bed" for st in over_mask.values()):
        answer = "masking alone (random_textmask)"
    elif winners:
        answer = "recommended: " + ", ".join(winners)
    else:
        answer = "nothing beats random batches on every test bed" if partial else "nothing beats random batches"
    if partial and not open_:
        answer += "; " + ", ".join(partial) + " beat random batches on some test beds only: not recommended"
    return {"beds": list(beds), "arms": rows, "over_mask": over_mask, "answer": answer}


def read_beds(files: list[Path]) -> dict[str, dict]:
    """The test beds' --report JSONs, named by their config; two of one bed, or a report made before the
    verdicts existed, is an error naming the file."""
    beds, src = {}, {}
    for f in files:
        rep = json.loads(Path(f).read_text())
        name = Path(rep["config"]).stem
        if name in beds:
            raise SystemExit(f"{f} and {src[name]} are both reports of test bed {name} ({rep['config']})")
        if any(n != "random" and "decision" not in r for n, r in rep["arms"].items()):
            raise SystemExit(f"{f} has no verdicts (made before they existed): rebuild it with --report")
        beds[name], src[name] = rep, f
    if len(beds) < 2:
        raise SystemExit(f"--decide needs the reports of every test bed (the plan has two); got {len(beds)}")
    return beds


def decide_markdown(beds: dict[str, dict], rec: dict, cmd: str) -> str:
    names = list(beds)
    lines = [
        "# False negatives: the plan's decision over both test beds",
        "",
        f"Command: `{cmd}`.",
        "",
        f"**{rec['answer']}.**",
        "",
        "Each cell: the verdict by the plan's rule, then the paired difference to the baseline with its 95% "
        "interval, test BLEU-4 / mean dev R@1 (seeds per bed in the tables).",
        "",
        "| arm | vs | " + " | ".join(names) + " | status |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for arm, r in rec["arms"].items():
        cells = []
        for bed in names:
            a = beds[bed]["arms"].get(arm)
            if not a:
                cells.append("not run")
                continue
            d = a.get("decision", {}).get(r["vs"], {})
            cells.append(f"{r['verdicts'][bed]}: {cell(a['test_bleu4'].get('vs_random'))} / {cell(d.get('dev_r1'))}")
        lines.append(f"| {arm} | {r['vs']} | " + " | ".join(cells) + f" | {r['status']} |")
    also = [(arm, o) for arm, r in rec["arms"].items() for o in r["also"]]
    if also:
        lines += [
            "",
            "Does the addition help? The same rule against the other arm:",
            "",
            "| arm | vs | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names),
        ]
        lines += [
            f"| {arm} | {o} | " + " | ".join(rec["arms"][arm]["also"][o][b] for b in names) + " |" for arm, o in also
        ]
    lines += [
        "",
        "Pair Selection arms against the mask alone (`random_textmask`): "
        + ", ".join(f"{a} {st}" for a, st in rec["over_mask"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def write_table(table: Path, out: dict, md: str) -> int:
    """The Markdown table, its JSON beside it, and the table on stdout."""
    table.parent.mkdir(parents=True, exist_ok=True)
    table.with_suffix(".json").write_text(json.dumps(out, indent=1))
    table.write_text(md)
    print(md)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=[], choices=sorted(ARMS), help="arms to run (then report)")
    p.add_argument("--report", action="store_true", help="only write the table from the runs that exist")
    p.add_argument(
        "--runs",
        type=Path,
        default=None,
        metavar="JSONL",
        help="--report from a study's JSONL (written by --save-runs) instead of the runs under --out",
    )
    p.add_argument(
        "--save-runs",
        type=Path,
        default=None,
        metavar="JSONL",
        help="write what the report is built from (the runs under --out) to JSONL, then report",
    )
    p.add_argument(
        "--tune-report",
        action="store_true",
        help="the dev-only tuning table and the plan's choices "
        "(the false-negative study) from the tuning arms that exist under --seeds",
    )
    p.add_argument(
        "--decide",
        type=Path,
        nargs="+",
        default=[],
        metavar="JSON",
        help="the false-negative study: the plan's recommendation from the --report JSON of each test bed (to --table)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0-5, or every seed of --runs")
    p.add_argument("--config", type=Path, default=HERE / "configs" / "ps_paraphrase.yaml")
    p.add_argument("--pretrain-config", type=Path, default=HERE / "configs" / "ps_pretrain.yaml")
    p.add_argument("--deepspeed", default="configs/zero2.json")
    p.add_argument("--nproc", type=int, default=1, help="ranks per run")
    p.add_argument(
        "--port",
        type=int,
        default=31000,
        help="first master port (two commands side by side: give them ports 1000 apart)",
    )
    p.add_argument("--jobs", type=int, default=1, help="seeds run side by side (each with cores / jobs threads)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "ps_ablation")
    p.add_argument("--table", type=Path, default=HERE / "results" / "ps_ablation.md")
    return p


def command(argv: list[str]) -> str:
    """The command line a table records: how to make it again from the checkout's root."""
    return "python -m experiments.pair_selection.ablation " + " ".join(shlex.quote(a) for a in argv)


def build(args, cmd: str) -> tuple[dict, str]:
    """The JSON and the Markdown that --table gets (--decide, --tune-report or --report), without writing them.
    A hand-written header above an existing table's `Command:` line replaces the generated title."""
    if args.decide:
        beds = read_beds(args.decide)
        rec = recommend(beds)
        return {**rec, "command": cmd}, decide_markdown(beds, rec, cmd)
    if args.tune_report:
        out = tune_report(args)
        return {**out, "command": cmd}, tune_markdown(out, cmd)
    if args.runs:
        study = load_runs(args.runs)
        seeds = args.seeds or study["study"]["seeds"]
    else:
        study = collect(args)
        seeds = args.seeds
        if args.save_runs:
            save_runs(args.save_runs, study)
    out = report(study, seeds)
    out["command"] = cmd
    md = markdown(out, cmd)
    old = args.table.read_text() if args.table.is_file() else ""
    if "\nCommand: `" in old:
        md = old[: old.index("\nCommand: `") + 1] + md[md.index("\nCommand: `") + 1 :]
    return out, md


def main(argv=None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    args = parser().parse_args(argv)
    args.out = args.out.resolve()
    if args.seeds is None and not args.runs:
        args.seeds = [0, 1, 2, 3, 4, 5]
    if not (args.decide or args.runs):
        run_seeds(args)
    out, md = build(args, command(argv))
    return write_table(args.table, out, md)


if __name__ == "__main__":
    sys.exit(main())
