"""tools/ps_ablation.py: the paired statistics, the power calculation, the table, and that every arm is a
valid recipe of the test bed (its overrides load, its table comes from a reference arm)."""
from __future__ import annotations

import importlib.util
import math
import random
import statistics
import sys
from pathlib import Path

import pytest

from sclslt.config import load_config

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ps_ablation", ROOT / "tools" / "ps_ablation.py")
abl = importlib.util.module_from_spec(_spec)
sys.modules["ps_ablation"] = abl         # dataclasses look their module up
_spec.loader.exec_module(abl)


def test_paired_interval_matches_its_definition_and_resolves_only_clear_gaps():
    rng = random.Random(0)
    for n in (2, 3, 6, 12, 40):
        diffs = [rng.gauss(0.5, 2.0) for _ in range(n)]
        r = abl.paired(diffs)
        half = abl.t975(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
        assert r["mean"] == pytest.approx(statistics.mean(diffs))
        assert r["ci95"] == pytest.approx([r["mean"] - half, r["mean"] + half])
        assert r["resolved"] == (r["ci95"][0] > 0 or r["ci95"][1] < 0)
    assert abl.paired([3.0, 3.1, 2.9, 3.0])["resolved"]            # a steady gap
    assert not abl.paired([3.0, -2.0, 4.0, -1.0])["resolved"]      # a noisy one
    assert not abl.paired([5.0])["resolved"]                       # one seed resolves nothing
    # the t quantile falls with the degrees of freedom towards the normal's
    qs = [abl.t975(df) for df in range(1, 60)]
    assert all(a >= b for a, b in zip(qs, qs[1:])) and qs[-1] == pytest.approx(1.96)


def test_seeds_for_a_two_point_gap_grow_with_the_square_of_the_spread():
    a, b = abl.seeds_for_gap(2.0), abl.seeds_for_gap(4.0)
    assert a == math.ceil((1.96 + 0.8416) ** 2) and b == math.ceil(4 * (1.96 + 0.8416) ** 2)
    assert abl.seeds_for_gap(float("nan")) is None


@pytest.mark.parametrize("name", sorted(abl.ARMS))
def test_every_arm_is_a_valid_recipe_of_the_test_bed(name):
    arm = abl.ARMS[name]
    table = ["--selection.table", "reference.safetensors"] if arm.table else []
    cfg = load_config(ROOT / "configs" / "ps_paraphrase.yaml", list(arm.args) + table)
    if arm.table:
        ref, early, late, score = arm.table
        assert score in ("pooled", "cico")
        assert abl.ARMS[ref].reference and int(early[5:]) < int(late[5:]) <= cfg.stage1.epochs
        assert cfg.selection.mode == "ps"
        assert load_config(ROOT / "configs" / "ps_paraphrase.yaml", list(abl.ARMS[ref].args)).model.similarity \
            == cfg.model.similarity
    assert arm.baseline in abl.ARMS and (arm.baseline != name or name == "random")
    if arm.table:                    # planned arms are compared with a random-batch arm of their reference's recipe
        base = load_config(ROOT / "configs" / "ps_paraphrase.yaml", list(abl.ARMS[arm.baseline].args))
        assert abl.ARMS[arm.baseline].table is None and base.model.similarity == cfg.model.similarity
        assert arm.baseline == arm.table[0] or base.stage1.mask_same_sentence == cfg.stage1.mask_same_sentence
    if name == "random_nomask":
        assert not cfg.stage1.mask_same_sentence


def test_markdown_table_shows_means_and_paired_intervals():
    base = {m: {"mean": 10.0, "sd": 1.0, "values": [9.0, 11.0]} for m in abl.METRICS}
    arm = {m: {"mean": 12.0, "sd": 1.0, "values": [11.0, 13.0],
               "vs_random": abl.paired([2.0, 2.1, 1.9])} for m in abl.METRICS}
    out = {"config": "configs/ps_paraphrase.yaml", "seeds": [0, 1, 2], "bleu_signature": "sig",
           "arms": {"random": {"help": "h", "seeds": [0, 1, 2], **base},
                    "ps": {"help": "h", "seeds": [0, 1, 2], "baseline": "random", **arm}},
           "power": {m: {"paired_sd": 0.1, "seeds_for_2_points": 2, "from": "x"} for m in abl.METRICS},
           "partners": {"per_clip": {"exact": 1.0}}, "ps_batches_first_seed": None}
    md = abl.markdown(out, "python tools/ps_ablation.py --report")
    row = [line for line in md.splitlines() if line.startswith("| ps |")][0]
    assert row.startswith("| ps | random | 3 |")
    assert row.count("12.00 (+2.00 [") == 4 and row.count("] *") == 4
    assert "| random |  | 3 | 10.00 | 10.00 | 10.00 | 10.00 |" in md
