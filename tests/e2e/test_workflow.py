"""The whole workflow as a user with only `pip install -e .` runs it: `sclslt` commands alone, from a folder
outside the checkout (no tools/, no launch/ at hand): shard a corpus of frame folders listed in a CSV, train a
reference run, export its reference table, train with Pair Selection from it, evaluate, export, translate.
Each step's output is checked against what the next one reads, and the last against the run's own results."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import TINY, frame_folder

SPLITS = {"train": 32, "dev": 8, "test": 8}


def sclslt(cwd: Path, *args: str) -> str:
    """The installed `sclslt` command (the console script beside this Python), run in `cwd`."""
    exe = Path(sys.executable).with_name("sclslt")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "sclslt.cli"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(DS_ACCELERATOR="cpu", SCLSLT_PLAIN_LOG="1", OMP_NUM_THREADS="1")
    p = subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"sclslt {' '.join(args)}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def corpus(root: Path) -> Path:
    """Frame folders of synthetic clips and the CSV that lists them (the `manifest` layout)."""
    from sclslt.config import SyntheticConfig
    from sclslt.data.synthetic import SyntheticCorpus

    syn = SyntheticCorpus(
        SyntheticConfig(
            **{
                **TINY["data"]["synthetic"],
                "n_train": SPLITS["train"],
                "n_dev": SPLITS["dev"],
                "n_test": SPLITS["test"],
            }
        )
    )
    rows = []
    for split, n in SPLITS.items():
        for i in range(n):
            s = syn.sample(split, i)
            frame_folder(root / "clips" / f"{split}_{i:03d}", s["frames"])
            rows.append({"path": f"clips/{split}_{i:03d}", "text": s["text"], "split": split})
    with open(root / "corpus.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "text", "split"])
        w.writeheader()
        w.writerows(rows)
    return root / "corpus.csv"


def test_the_recipe_runs_with_sclslt_commands_alone(tmp_path):
    """Mutation caught (checked): the Pair Selection run ignoring its table (random batches: no plan written)."""
    work = tmp_path / "work"
    work.mkdir()
    sclslt(
        work,
        "shard",
        "--layout",
        "manifest",
        "--root",
        str(corpus(tmp_path)),
        "--out",
        "shards",
        "--size",
        "16",
        "--no-progress",
    )
    assert {p.name for p in (work / "shards").glob("*.json")} == {"train.json", "dev.json", "test.json"}
    exp = {k: v for k, v in TINY.items() if k != "data"}
    exp["data"] = {"corpus": "shards", "shards_dir": "shards"}
    exp["stage2"] = {**exp["stage2"], "epochs": 2}
    (work / "exp.yaml").write_text(yaml.safe_dump(exp))
    sclslt(
        work,
        "train",
        "--deepspeed",
        "zero2",
        "--config",
        "exp.yaml",
        "--train.run_dir",
        "ref",
        "--stage2.enabled",
        "false",
        "--stage1.epochs",
        "2",
        "--checkpoint.every_epochs",
        "1",
    )
    out = sclslt(
        work,
        "reference",
        "--run",
        "ref",
        "--early",
        "epoch0000",
        "--late",
        "epoch0002",
        "--out",
        "ref/table.safetensors",
    )
    assert "wrote ref/table.safetensors: 32 samples" in out
    sclslt(
        work,
        "train",
        "--deepspeed",
        "zero2",
        "--config",
        "exp.yaml",
        "--train.run_dir",
        "scl",
        "--selection.mode",
        "ps",
        "--selection.table",
        "ref/table.safetensors",
    )
    results = json.loads((work / "scl" / "results.json").read_text())
    table = results["provenance"]["selection_table"]
    assert table["sha256"] == hashlib.sha256((work / "ref" / "table.safetensors").read_bytes()).hexdigest()
    assert (table["run"], table["early"], table["late"]) == ("ref", "epoch0000", "epoch0002")
    assert (work / "scl" / "stage1" / "selection" / "plan_e0000.json").is_file()
    out = sclslt(work, "evaluate", "--run", "scl")
    report = json.loads(Path(work / out.split("wrote ")[-1].strip()).read_text())
    assert report["model"] == results["model"]
    sclslt(work, "export", "--run", "scl", "--out", "model")
    hyps = {
        r["key"]: r["hyp"] for r in map(json.loads, (work / "scl" / "hypotheses.test.jsonl").read_text().splitlines())
    }
    clip = tmp_path / "clips" / "test_000"
    shutil.copytree(clip, work / "mine")  # any folder of frames, outside the corpus
    got = json.loads(sclslt(work, "translate", "--model", "model", "mine", "--json").splitlines()[0])
    assert got["text"] == hyps["clips_test_000"]
