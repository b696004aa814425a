"""experiments/pair_selection/trajectories.py: the classification of negative-pair trajectories on hand-made similarity
matrices (quantile and absolute thresholds), then the command end to end on a small reference run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

from experiments.pair_selection import trajectories as traj
from tests.helpers import ROOT, TRAIN_ENV


def matrix(off_diag: dict, n: int = 3, diag: float = 5.0) -> torch.Tensor:
    """(n x n) with the given (i, j) -> value off the diagonal and a large diagonal (must be ignored)."""
    m = torch.full((n, n), diag)
    for (i, j), v in off_diag.items():
        m[i, j] = v
    assert all((i, j) in off_diag for i in range(n) for j in range(n) if i != j)
    return m


# negatives of 3 samples: (0,1) (0,2) (1,0) (1,2) (2,0) (2,1); samples 0 and 1 share a sentence
FIRST = matrix({(0, 1): 0.9, (0, 2): 0.8, (1, 0): 0.7, (1, 2): 0.1, (2, 0): 0.2, (2, 1): 0.3})
MIDDLE = matrix({(0, 1): 0.5, (0, 2): 0.0, (1, 0): 0.0, (1, 2): 0.0, (2, 0): 0.0, (2, 1): 0.0})
LAST = matrix({(0, 1): 0.1, (0, 2): 0.9, (1, 0): 0.8, (1, 2): 0.7, (2, 0): 0.2, (2, 1): 0.3})
SIDS = torch.tensor([5, 5, 7])


def test_classify_quantile_mode():
    # median of the 6 negatives: the top 3 are High at each checkpoint
    # first High: (0,1) (0,2) (1,0); last High: (0,2) (1,0) (1,2)
    r = traj.classify([FIRST, MIDDLE, LAST], SIDS, high=0.5, mode="quantile")
    assert r["n"] == 3 and r["negatives"] == 6 and r["checkpoints"] == 3
    assert r["counts"] == {"H->L": 1, "H->H": 2, "L->H": 1, "L->L": 2}
    assert r["fractions"] == pytest.approx({"H->L": 1 / 6, "H->H": 2 / 6, "L->H": 1 / 6, "L->L": 2 / 6})
    assert r["thresholds"][0] == pytest.approx(0.5) and r["thresholds"][2] == pytest.approx(0.5)
    assert r["high_fraction"] == pytest.approx([0.5, 1 / 6, 0.5])
    ss = r["same_sentence"]
    assert ss["hh_count"] == 1 and ss["hh_fraction"] == pytest.approx(0.5)  # (1,0) of (0,2), (1,0)
    assert ss["negatives_count"] == 2 and ss["negatives_fraction"] == pytest.approx(2 / 6)
    assert ss["counts_by_class"] == {"H->L": 1, "H->H": 1, "L->H": 0, "L->L": 0}
    m = r["mean_similarity"]
    assert m["H->L"] == pytest.approx([0.9, 0.5, 0.1])
    assert m["H->H"] == pytest.approx([0.75, 0.0, 0.85])
    assert m["L->H"] == pytest.approx([0.1, 0.0, 0.7])
    assert m["L->L"] == pytest.approx([0.25, 0.0, 0.25])
    ex = r["examples"]["H->H"]
    assert sorted((e["video"], e["text"]) for e in ex) == [(0, 2), (1, 0)]
    assert [e["similarity"] for e in ex if e["video"] == 0][0] == pytest.approx([0.8, 0.0, 0.9])
    assert "paraphrase" not in r
    # ground-truth meanings: samples 0 and 2 say one meaning in other words (a paraphrase pair);
    # (0,2) is H->H, (2,0) L->L; the same-sentence pairs (0,1), (1,0) are not paraphrases
    pp = traj.classify([FIRST, MIDDLE, LAST], SIDS, high=0.5, mode="quantile", meanings=[1, 2, 1])["paraphrase"]
    assert pp["hh_count"] == 1 and pp["hh_fraction"] == pytest.approx(0.5)
    assert pp["negatives_count"] == 2 and pp["counts_by_class"] == {"H->L": 0, "H->H": 1, "L->H": 0, "L->L": 1}
    # a higher quantile: only the top 1 (> 5/6 quantile) is High; classes use first and last only
    r = traj.classify([FIRST, LAST], SIDS, high=0.9, mode="quantile")
    assert r["counts"] == {"H->L": 1, "H->H": 0, "L->H": 1, "L->L": 4}
    assert r["same_sentence"]["hh_fraction"] is None and r["mean_similarity"]["H->H"] == [None, None]


def test_classify_first_mode_is_the_default_and_lets_h_to_l_differ_from_l_to_h():
    # similarities rise by 0.25 from FIRST: the first checkpoint's median (0.5) stays the threshold, so
    # (2,1) becomes High (0.55) and L->H outnumbers H->L; each checkpoint's own median (0.75) hides it
    risen = matrix({(0, 1): 0.35, (0, 2): 1.15, (1, 0): 1.05, (1, 2): 0.95, (2, 0): 0.45, (2, 1): 0.55})
    r = traj.classify([FIRST, MIDDLE, risen], SIDS)
    assert r["mode"] == "first" and r["thresholds"] == pytest.approx([0.5, 0.5, 0.5])
    assert r["counts"] == {"H->L": 1, "H->H": 2, "L->H": 2, "L->L": 1}
    q = traj.classify([FIRST, MIDDLE, risen], SIDS, mode="quantile")
    assert q["counts"] == {"H->L": 1, "H->H": 2, "L->H": 1, "L->L": 2}
    with pytest.raises(ValueError):
        traj.classify([FIRST, LAST], SIDS, high=1.5)


def test_classify_absolute_mode():
    # High = cosine > 0.75: first (0,1) (0,2); last (0,2) (1,0)
    r = traj.classify([FIRST, MIDDLE, LAST], SIDS, high=0.75, mode="absolute")
    assert r["counts"] == {"H->L": 1, "H->H": 1, "L->H": 1, "L->L": 3}
    assert sum(r["fractions"].values()) == pytest.approx(1.0)
    assert r["thresholds"] == [0.75, 0.75, 0.75]
    assert r["same_sentence"]["hh_count"] == 0 and r["same_sentence"]["hh_fraction"] == 0.0
    assert r["mean_similarity"]["L->L"] == pytest.approx([(0.1 + 0.2 + 0.3) / 3, 0.0, (0.7 + 0.2 + 0.3) / 3])
    # absolute thresholds may leave every pair Low; a quantile outside [0, 1] is refused
    assert traj.classify([FIRST, LAST], SIDS, high=0.95, mode="absolute")["counts"]["L->L"] == 6
    with pytest.raises(ValueError):
        traj.classify([FIRST, LAST], SIDS, high=1.5, mode="quantile")
    with pytest.raises(ValueError):
        traj.classify([FIRST], SIDS)


def test_lazy_similarities_and_quantile():
    g = torch.Generator().manual_seed(0)
    views = [
        (F.normalize(torch.randn(40, 8, generator=g), dim=-1), F.normalize(torch.randn(40, 8, generator=g), dim=-1))
        for _ in range(4)
    ]
    sids = torch.randint(0, 10, (40,), generator=g)
    lazy = traj.classify(traj.PairSims(views), sids, examples=3, seed=1)
    full = traj.classify([v @ t.t() for v, t in views], sids, examples=3, seed=1)
    assert lazy == full
    assert sum(lazy["counts"].values()) == 40 * 39
    # quantile mode at 0.5: half of the negatives are High at each end, so H->L == L->H
    q = traj.classify(traj.PairSims(views), sids, mode="quantile")
    assert q["counts"]["H->L"] == q["counts"]["L->H"]
    assert len(set(lazy["thresholds"])) == 1  # the default: the first checkpoint's median, fixed
    x = torch.randn(1001, generator=g)
    for q in (0.0, 0.1, 0.5, 0.77, 1.0):
        assert traj.quantile(x, q) == pytest.approx(float(torch.quantile(x, q)), abs=1e-6)


def test_tags_and_errors(tmp_path, capsys):
    ckpt = tmp_path / "run" / "stage1" / "checkpoints"
    for t in ("epoch0010", "epoch0002", "step00000012", "epoch0000"):
        (ckpt / t).mkdir(parents=True)
    (ckpt / "latest").write_text("step00000012")
    assert traj.find_tags(ckpt) == ["epoch0000", "epoch0002", "epoch0010"]
    assert traj.main(["--run", str(tmp_path / "run"), "--tags", "epoch0002"]) == 2
    err = capsys.readouterr().err
    assert "at least 2 checkpoints" in err and "step00000012" in err
    assert traj.main(["--run", str(tmp_path / "run"), "--tags", "epoch0000", "epoch0005"]) == 2
    assert "epoch0005" in capsys.readouterr().err
    assert traj.main(["--run", str(tmp_path / "none")]) == 2


@pytest.fixture(scope="module")
def ref_run(tiny_cfg_dict, tmp_path_factory):
    """A small reference run: stage 1 only, 2 epochs, epoch0000..epoch0002 checkpoints, one process."""
    d = tmp_path_factory.mktemp("traj")
    cfg = yaml.safe_load(yaml.safe_dump(tiny_cfg_dict))
    cfg["data"]["synthetic"]["n_train"] = 48
    cfg["stage1"]["epochs"] = 2
    cfg["stage2"]["enabled"] = False
    cfg["checkpoint"] = {"every_epochs": 1}
    cfg["train"]["max_steps"] = 0
    path = d / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = d / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--deepspeed",
            "configs/zero2.json",
            "--config",
            str(path),
            "--train.run_dir",
            str(run),
        ],
        cwd=ROOT,
        env=TRAIN_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return run


def tool(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.pair_selection.trajectories", *args],
        cwd=ROOT,
        env=TRAIN_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_tool_end_to_end(ref_run):
    from sclslt.selection.table import load_snapshot

    proc = tool("--run", str(ref_run), "--sample", "32", "--seed", "3")
    out = ref_run / "stage1" / "trajectories"
    rep = json.loads((out / "report.json").read_text())
    assert rep["tags"] == ["epoch0000", "epoch0001", "epoch0002"]
    assert rep["sample_size"] == 32 and rep["split_size"] == 48 and len(set(rep["sample_keys"])) == 32
    assert rep["negatives"] == 32 * 31 == sum(rep["counts"].values())
    assert sum(rep["fractions"].values()) == pytest.approx(1.0)
    assert rep["mode"] == "first" and rep["high"] == 0.5 and rep["args"]["seed"] == 3
    assert all(len(v) == 3 for v in rep["mean_similarity"].values())
    ss = rep["same_sentence"]
    assert ss["hh_count"] <= rep["counts"]["H->H"] and ss["negatives_count"] == sum(ss["counts_by_class"].values())
    assert (out / "trajectories.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "H->L" in proc.stdout and "known false negatives" in proc.stdout
    assert rep["paraphrase"]["negatives_count"] == sum(rep["paraphrase"]["counts_by_class"].values())  # synthetic

    # the report is the classification of the sample's embeddings (the saved embedding passes)
    snaps = [load_snapshot(out / "embeddings" / f"train.{t}.safetensors") for t in rep["tags"]]
    rows = torch.tensor([snaps[0]["keys"].index(k) for k in rep["sample_keys"]])
    want = traj.classify(
        [s["video"][rows] @ s["text"][rows].t() for s in snaps], snaps[0]["sentence_ids"][rows], 0.5, "first", 5, 3
    )
    assert want["counts"] == rep["counts"] and all(
        want["mean_similarity"][c] == pytest.approx(rep["mean_similarity"][c]) for c in rep["mean_similarity"]
    )
    assert not torch.allclose(snaps[0]["video"], snaps[-1]["video"])  # the checkpoints differ

    # a second call reuses the embedding passes; absolute threshold, two chosen tags, another output
    proc = tool(
        "--run",
        str(ref_run),
        "--tags",
        "epoch0000",
        "epoch0002",
        "--sample",
        "1000",
        "--threshold-mode",
        "absolute",
        "--high",
        "0.2",
        "--out",
        str(ref_run / "abs"),
    )
    rep = json.loads((ref_run / "abs" / "report.json").read_text())
    assert proc.stdout.count("cached") == 2 and "embedded" not in proc.stdout
    assert rep["sample_size"] == 48 and rep["negatives"] == 48 * 47 == sum(rep["counts"].values())
    assert rep["thresholds"] == [0.2, 0.2] and (ref_run / "abs" / "trajectories.png").is_file()
