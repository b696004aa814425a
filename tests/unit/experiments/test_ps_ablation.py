"""experiments/pair_selection/ablation.py: the paired statistics, the power calculation, the table, and that every
arm is a
valid recipe of the test bed (its overrides load, its table comes from a reference arm)."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest

from experiments.pair_selection import ablation as abl
from sclslt.config import load_config
from tests.helpers import ROOT

TESTBED = ROOT / "experiments" / "pair_selection" / "configs" / "ps_paraphrase.yaml"


# two-sided 95% Student t quantiles from a published table (NIST/SEMATECH e-Handbook, 1.3.6.7.2), written out
PUBLISHED_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    5: 2.571,
    9: 2.262,
    11: 2.201,
    22: 2.074,
    27: 2.052,
    35: 2.030,
    39: 2.023,
    50: 2.009,
    100: 1.984,
    1000: 1.962,
}


def test_the_t_quantile_is_students():
    """Mutations caught (checked): the normal's 1.96 for every df (the 3-seed intervals would shrink 1.6x and
    resolve), the old table's step down to 1.96 beyond 30 df (2.023 at 39), df 21-24 rounded to df 20's."""
    for df, want in PUBLISHED_T975.items():
        assert abl.t975(df) == pytest.approx(want, abs=2e-3), df


def test_paired_interval_matches_its_definition_and_resolves_only_clear_gaps():
    """The interval of n paired differences is mean +- t(n-1) sd / sqrt(n), with t written out (3 seeds: 4.303)."""
    rng = random.Random(0)
    for n in (2, 3, 6, 12, 40):
        diffs = [rng.gauss(0.5, 2.0) for _ in range(n)]
        r = abl.paired(diffs)
        half = PUBLISHED_T975[n - 1] * statistics.stdev(diffs) / math.sqrt(n)
        assert r["mean"] == pytest.approx(statistics.mean(diffs))
        assert sum(r["ci95"]) / 2 == pytest.approx(r["mean"])
        assert (r["ci95"][1] - r["ci95"][0]) / 2 == pytest.approx(half, rel=1e-3)
        assert r["resolved"] == (r["ci95"][0] > 0 or r["ci95"][1] < 0)
    assert abl.paired([3.0, 3.1, 2.9, 3.0])["resolved"]  # a steady gap
    assert not abl.paired([3.0, -2.0, 4.0, -1.0])["resolved"]  # a noisy one
    assert not abl.paired([5.0])["resolved"]  # one seed resolves nothing
    # the t quantile falls with the degrees of freedom towards the normal's
    qs = [abl.t975(df) for df in range(1, 2000)]
    assert all(a > b for a, b in zip(qs, qs[1:])) and 1.96 < qs[-1] < 1.962


def test_seeds_for_a_two_point_gap_grow_with_the_square_of_the_spread():
    a, b = abl.seeds_for_gap(2.0), abl.seeds_for_gap(4.0)
    assert a == math.ceil((1.96 + 0.8416) ** 2) and b == math.ceil(4 * (1.96 + 0.8416) ** 2)
    assert abl.seeds_for_gap(float("nan")) is None


@pytest.mark.parametrize("name", sorted(abl.ARMS))
def test_every_arm_is_a_valid_recipe_of_the_test_bed(name):
    arm = abl.ARMS[name]
    table = ["--selection.table", "reference.safetensors"] if arm.table else []
    cfg = load_config(TESTBED, list(arm.args) + table)
    if arm.table:
        ref, early, late, score = arm.table
        assert score in ("pooled", "cico")
        assert abl.ARMS[ref].reference and int(early[5:]) < int(late[5:]) <= cfg.stage1.epochs
        assert cfg.selection.mode == "ps"
        assert load_config(TESTBED, list(abl.ARMS[ref].args)).model.similarity == cfg.model.similarity
    assert arm.baseline in abl.ARMS and (arm.baseline != name or name == "random")
    if arm.table:  # planned arms are compared with a random-batch arm of their reference's recipe
        base = load_config(TESTBED, list(abl.ARMS[arm.baseline].args))
        assert abl.ARMS[arm.baseline].table is None and base.model.similarity == cfg.model.similarity
        assert arm.baseline == arm.table[0] or base.stage1.mask_same_sentence == cfg.stage1.mask_same_sentence
    if name == "random_nomask":
        assert not cfg.stage1.mask_same_sentence


def test_markdown_table_shows_means_and_paired_intervals():
    base = {m: {"mean": 10.0, "sd": 1.0, "values": [9.0, 11.0]} for m in abl.METRICS}
    arm = {
        m: {"mean": 12.0, "sd": 1.0, "values": [11.0, 13.0], "vs_random": abl.paired([2.0, 2.1, 1.9])}
        for m in abl.METRICS
    }
    out = {
        "config": "configs/ps_paraphrase.yaml",
        "seeds": [0, 1, 2],
        "bleu_signature": "sig",
        "arms": {
            "random": {"help": "h", "seeds": [0, 1, 2], **base},
            "ps": {"help": "h", "seeds": [0, 1, 2], "baseline": "random", **arm},
        },
        "power": {m: {"paired_sd": 0.1, "seeds_for_2_points": 2, "from": "x"} for m in abl.METRICS},
        "partners": {"per_clip": {"exact": 1.0}},
        "ps_batches_first_seed": None,
    }
    md = abl.markdown(out, "python -m experiments.pair_selection.ablation --report")
    row = [line for line in md.splitlines() if line.startswith("| ps |")][0]
    assert row.startswith("| ps | random | 3 |")
    assert row.count("12.00 (+2.00 [") == 4 and row.count("] *") == 4
    assert "| random |  | 3 | 10.00 | 10.00 | 10.00 | 10.00 |" in md


def _res(v2t: float, t2v: float, bleu: float, rouge: float) -> dict:
    return {"retrieval": {"stage1": {"v2t_r1": v2t, "t2v_r1": t2v}}, "model": {"bleu4": bleu, "rouge_l": rouge}}


def _runs(
    rng: random.Random, shift=(0.0, 0.0, 0.0, 0.0), sd=(2.0, 2.0, 2.0, 2.0), base=None, mirror=False, seeds=range(10)
) -> dict[int, dict]:
    """Per-seed results of an arm: `base`'s (or fresh values) + shift + a spread of +-sd alternating over the
    seeds (mean 0 over an even count: an unshifted metric stays unresolved, a shift far beyond sd resolves);
    `mirror` gives the two R@1 opposite spreads, so each direction is noisy while their mean is steady."""
    out = {}
    for i, s in enumerate(seeds):
        b = base[s] if base else _res(*(rng.uniform(40, 60) for _ in range(4)))
        e = [x * (1 if i % 2 == 0 else -1) for x in sd]
        if mirror:
            e[1] = -e[0]
        vals = [abl.metric(b, p) for p in abl.METRICS.values()]
        out[s] = _res(*(v + d + n for v, d, n in zip(vals, shift, e)))
    return out


def test_the_plans_verdict_on_one_comparison():
    rng = random.Random(1)
    base = _runs(rng)
    cases = {  # (shift, noise sd, mirrored R@1 noise) -> verdict
        ((0, 0, 3.0, 0), (2, 2, 0.3, 2), False): "beats",  # test BLEU-4 clearly up
        ((1.0, 1.0, 0, 0), (3, 3, 2, 2), True): "beats",  # only the mean of the two dev R@1 resolves
        ((0, 0, 3.0, -2.0), (2, 2, 0.3, 0.3), False): "mixed",  # BLEU up, ROUGE-L down
        ((-2.0, 0, 3.0, 0), (0.3, 2, 0.3, 2), False): "mixed",  # BLEU up, one direction's R@1 down
        ((-1.0, -1.0, 3.0, 0), (3, 3, 0.3, 2), True): "beats",  # the mean dev R@1 down is no primary metric
        ((0, 0, 0, -2.0), (2, 2, 2, 0.3), False): "worse",
        ((-1.0, -1.0, 0, 0), (3, 3, 2, 2), True): "worse",  # the mean dev R@1 below 0
        ((0, 0, 0, 0), (2, 2, 2, 2), False): "unresolved",
    }
    for (shift, sd, mirror), want in cases.items():
        arm = _runs(rng, shift, sd, base, mirror)
        c = abl.compare(arm, base)
        assert abl.verdict(c) == want, (shift, {m: d["ci95"] for m, d in c.items()})
        dev = [abl.dev_r1(arm[s]) - abl.dev_r1(base[s]) for s in base]
        assert c["dev_r1"]["mean"] == pytest.approx(statistics.mean(dev))
        if mirror:  # each direction alone unresolved, their mean resolved: the rule reads the mean
            assert not c["dev_v2t_r1"]["resolved"] and not c["dev_t2v_r1"]["resolved"] and c["dev_r1"]["resolved"]
    one = _runs(rng, (0, 0, 9.0, 0), seeds=[0], base=base)
    assert abl.verdict(abl.compare(one, base)) == "unresolved"  # one seed decides nothing
    # only the seeds both arms have are paired
    part = _runs(rng, (0, 0, 3.0, 0), (2, 2, 0.3, 2), base, seeds=range(4))
    assert abl.compare(part, base)["test_bleu4"]["n"] == abl.compare(base, part)["test_bleu4"]["n"] == 4


def _bed(rng: random.Random, up: dict[str, float], seeds=range(10), config="x.yaml") -> dict:
    """A test bed's report: every arm of the plan at noise, those in `up` with test BLEU-4 moved (tight)."""
    names = ("random", "random_nomask", "ps", "random_cico", *abl.METHODS, *abl.REPORTED)
    base = _runs(rng, seeds=seeds)
    results = {
        n: base
        if n == "random"
        else _runs(rng, (0, 0, up.get(n, 0.0), 0), (2, 2, 0.3 if n in up else 2, 2), base, seeds=seeds)
        for n in names
    }
    return {"config": config, "arms": abl.arm_rows(results)}


def test_the_plans_recommendation_over_both_test_beds(tmp_path):
    rng = random.Random(2)
    rec = abl.recommend({"tb1": _bed(rng, {"random_textmask": 3.0}), "tb2": _bed(rng, {"random_textmask": 3.0})})
    assert rec["answer"] == "masking alone (random_textmask)"
    assert rec["arms"]["random_textmask"]["verdicts"] == {"tb1": "beats", "tb2": "beats"}
    # a Pair Selection arm that beats the mask alone on both beds: both are recommended, not masking alone
    for ps_arm in ("ps_textmask", "ps_sep"):
        up = {"random_textmask": 3.0, ps_arm: 9.0}
        rec = abl.recommend({"tb1": _bed(rng, up), "tb2": _bed(rng, up)})
        assert rec["answer"] == "recommended: " + ", ".join(a for a in abl.METHODS if a in up), ps_arm
        assert rec["over_mask"][ps_arm] == "beats on every test bed"
    # ... on one bed only: still masking alone
    rec = abl.recommend(
        {
            "tb1": _bed(rng, {"random_textmask": 3.0, "ps_textmask": 9.0}),
            "tb2": _bed(rng, {"random_textmask": 3.0, "ps_textmask": 3.0}),
        }
    )
    assert (
        rec["answer"].startswith("masking alone") and rec["over_mask"]["ps_textmask"] == "beats on some test beds only"
    )
    # a win on one bed only, unresolved or worse on the other, recommends nothing, and names it
    for other in (0.0, -3.0):
        rec = abl.recommend({"tb1": _bed(rng, {"ps_sep": 3.0}), "tb2": _bed(rng, {"ps_sep": other})})
        assert rec["answer"] == (
            "nothing beats random batches on every test bed; ps_sep beat random batches on "
            "some test beds only: not recommended"
        ), other
    assert abl.recommend({"tb1": _bed(rng, {}), "tb2": _bed(rng, {})})["answer"] == "nothing beats random batches"
    # an arm missing on a bed, or fewer than the plan's seeds, leaves the decision open
    tb2 = _bed(rng, {"random_textmask": 3.0})
    del tb2["arms"]["ps_textmask"]
    assert abl.recommend({"tb1": _bed(rng, {"random_textmask": 3.0}), "tb2": tb2})["answer"].startswith(
        "not decided: ps_textmask, ps_textmask vs random_textmask "
    )
    rec = abl.recommend({"tb1": _bed(rng, {}), "tb2": _bed(rng, {}, seeds=range(6))})
    assert rec["answer"].startswith("not decided") and rec["arms"]["ps_sep"]["verdicts"]["tb2"] == "6 of 10 seeds"
    # the command: one JSON per bed, named by its config
    files = []
    for i in range(2):
        f = tmp_path / f"tb{i}.json"
        f.write_text(json.dumps(_bed(rng, {"random_textmask": 3.0}, config=f"configs/bed{i}.yaml")))
        files.append(str(f))
    assert abl.main(["--decide", *files, "--table", str(tmp_path / "decision.md")]) == 0
    md = (tmp_path / "decision.md").read_text()
    assert "**masking alone (random_textmask).**" in md and "| bed0 | bed1 |" in md
    row = [ln for ln in md.splitlines() if ln.startswith("| random_textmask | random |")][0]
    assert row.count("beats: +3.") == 2 and row.endswith("| beats on every test bed |")
    # two reports of one bed, one bed alone, or a report without verdicts: errors naming the file
    with pytest.raises(SystemExit, match="both reports of test bed bed0"):
        abl.main(["--decide", files[0], files[0], "--table", str(tmp_path / "d.md")])
    with pytest.raises(SystemExit, match="needs the reports of every test bed"):
        abl.main(["--decide", files[0], "--table", str(tmp_path / "d.md")])
    old = json.loads(Path(files[1]).read_text())
    del old["arms"]["ps"]["decision"]
    Path(files[1]).write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="tb1.json has no verdicts"):
        abl.main(["--decide", *files, "--table", str(tmp_path / "d.md")])
