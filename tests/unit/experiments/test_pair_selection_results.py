"""The Pair Selection study's committed tables are what its JSONL of runs rebuilds, byte for byte.

The run folders (batches, plans, tables) are not kept: each study keeps one JSONL, a line for the study and
one per run (`experiments/pair_selection/results/*.runs.jsonl`). This rebuilds every table made from runs
(the three ablation tables and the decision over both test beds) from those files with the command each
table records, and compares the Markdown and the JSON beside it with the committed bytes. Fast: no runs.

Mutation caught (checked): a seed's line dropped from a JSONL, one metric of one run changed in its last
digit, or the arms of a study reported in another order than ARMS's changes the bytes."""

from __future__ import annotations

import json
import shlex

import pytest

from experiments.pair_selection import ablation as abl
from tests.helpers import ROOT

RESULTS = "experiments/pair_selection/results"
STUDIES = ("false_negatives_tb1", "false_negatives_tb2", "ps_ablation")


def recorded(table: str) -> list[str]:
    """The arguments of the command a committed table says it was made with."""
    line = next(ln for ln in (ROOT / RESULTS / table).read_text().splitlines() if ln.startswith("Command: `"))
    cmd = line[len("Command: `") : line.index("`", len("Command: `"))]
    prefix = "python -m experiments.pair_selection.ablation "
    assert cmd.startswith(prefix), cmd
    return shlex.split(cmd[len(prefix) :])


def rebuilt(argv: list[str], monkeypatch) -> tuple[str, str]:
    monkeypatch.chdir(ROOT)
    args = abl.parser().parse_args(argv)
    out, md = abl.build(args, abl.command(argv))
    return json.dumps(out, indent=1), md


@pytest.mark.parametrize("study", STUDIES)
def test_each_table_rebuilds_byte_identical_from_its_runs(study, monkeypatch):
    argv = recorded(f"{study}.md")
    assert argv[:2] == ["--runs", f"{RESULTS}/{study}.runs.jsonl"] and "--report" in argv
    js, md = rebuilt(argv, monkeypatch)
    assert md == (ROOT / RESULTS / f"{study}.md").read_text()
    assert js == (ROOT / RESULTS / f"{study}.json").read_text()


def test_the_decision_rebuilds_byte_identical_from_both_test_beds(monkeypatch, tmp_path):
    # the beds' reports rebuilt from their JSONL (not the committed JSON), then --decide over them
    beds = []
    for study in ("false_negatives_tb1", "false_negatives_tb2"):
        js, _ = rebuilt(recorded(f"{study}.md"), monkeypatch)
        beds.append(tmp_path / f"{study}.json")
        beds[-1].write_text(js)
    argv = recorded("false_negatives_decision.md")
    assert argv[0] == "--decide"
    args = abl.parser().parse_args(["--decide", *map(str, beds), *argv[argv.index("--table") :]])
    out, md = abl.build(args, abl.command(argv))
    assert md == (ROOT / RESULTS / "false_negatives_decision.md").read_text()
    assert json.dumps(out, indent=1) == (ROOT / RESULTS / "false_negatives_decision.json").read_text()
