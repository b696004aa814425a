"""Experiment trackers: the tiny trained run (conftest.tiny_run) logged to TensorBoard, wandb
(offline) and Trackio (local store); what each holds is read back and compared with the run's own
metrics.csv and results.json; a resumed run continues the same tracker runs; a tracker that is unknown
or not installed is a config error naming the pip extra."""

from __future__ import annotations

import csv
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sclslt.config import ConfigError, from_dict
from tests.helpers import ROOT, tracker_env


def wandb_records(run: Path, run_id: str) -> list:
    """Every record of the wandb offline runs of `run_id` under <run>/wandb, in order: the .wandb files are
    wandb's append-only log (LevelDB log format: 7-byte file header, 32 KiB blocks of chunks with a
    7-byte header crc32 / length / type, FULL 1, FIRST 2, MIDDLE 3, LAST 4) of wandb_internal Record protos."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for f in sorted((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        data, pos, buf = f.read_bytes(), 7, b""
        assert data[:4] == b":W&B", f
        while pos + 7 <= len(data):
            room = 32768 - pos % 32768
            crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if room >= 7 else (0, 0, 0)
            if room < 7 or (kind == 0 and length == 0):
                pos += room
                continue
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            buf = chunk if kind in (1, 2) else buf + chunk
            if kind in (1, 4):
                r = pb.Record()
                r.ParseFromString(buf)
                out.append(r)
    return out


def wandb_logged(run: Path, run_id: str) -> tuple[list[dict], dict, dict]:
    """(history rows, summary, config) of the wandb runs of `run_id`."""
    hist, summary, config = [], {}, {}
    for r in wandb_records(run, run_id):
        kind = r.WhichOneof("record_type")
        key = lambda i: i.key or "/".join(i.nested_key)
        if kind == "history":
            hist.append({key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            summary.update({key(i): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    return hist, summary, config


def trackio_logged(store: Path, project: str, name: str) -> tuple[list[dict], dict]:
    """(logs, config) of a trackio run, read with trackio's own storage API from its local store."""
    code = (
        "import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
        "run = sys.argv[1], sys.argv[2]; "
        "print(json.dumps([S.get_logs(*run), S.get_run_config(*run)], default=str))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, project, name],
        env={**tracker_env(store.parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    return tuple(json.loads(p.stdout.splitlines()[-1]))


def train_rows(run: Path, stage: str) -> list[tuple[int, float]]:
    with open(run / stage / "metrics.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def same_curve(got: list[tuple], want: list[tuple]) -> bool:
    """(step, value) pairs: the same steps, the values to float32 rounding."""
    return [s for s, _ in got] == [s for s, _ in want] and [v for _, v in got] == pytest.approx([v for _, v in want])


def check_run_logged(rows: list[dict], run: Path, res: dict) -> None:
    """Rows of {name: value} (one per log call): each stage's train/loss against its step is metrics.csv's,
    and the retrieval and test numbers are results.json's."""
    for stage in ("stage1", "stage2"):
        got = [(r[f"{stage}/step"], r[f"{stage}/train/loss"]) for r in rows if f"{stage}/train/loss" in r]
        assert same_curve(got, train_rows(run, stage)), stage
    ret = [r for r in rows if "stage1/retrieval_dev/v2t_r1" in r]
    assert ret and ret[-1]["stage1/retrieval_dev/v2t_r1"] == pytest.approx(res["retrieval"]["stage1"]["v2t_r1"])
    test = [r for r in rows if "stage2/eval_test/bleu4" in r]
    assert test and test[-1]["stage2/eval_test/bleu4"] == pytest.approx(res["model"]["bleu4"])
    assert any("stage2/dev/bleu4" in r for r in rows)


def test_every_tracker_holds_the_runs_scalars_config_results_and_figures(tiny_run):
    run, _ = tiny_run
    res = json.loads((run / "results.json").read_text())
    ids = json.loads((run / "trackers.json").read_text())
    want = ["tensorboard", "wandb", "trackio"]  # the run's train.report_to

    hist, summary, config = wandb_logged(run, ids["wandb"])
    check_run_logged(hist, run, res)
    assert summary["model/bleu4"] == pytest.approx(res["model"]["bleu4"])
    assert summary["model/bleu_signature"] == res["model"]["bleu_signature"]
    assert config["train"]["report_to"] == want and config["stage1"]["epochs"] == 2
    assert any(k.startswith("figures/curves") for r in hist for k in r)

    logs, tconfig = trackio_logged(run.parent / "trackio", "sclslt", ids["trackio"])
    check_run_logged(logs, run, res)
    assert any(r.get("results/model/bleu4") == pytest.approx(res["model"]["bleu4"]) for r in logs)
    assert any("figures/curves" in r for r in logs)
    assert tconfig["train"]["report_to"] == want

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard" / "stage1"))
    acc.Reload()
    assert same_curve([(e.step, e.value) for e in acc.Scalars("train/loss")], train_rows(run, "stage1"))
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resumed_run_continues_its_tracker_runs(tiny_run, tmp_path):
    run, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.copytree(run.parent / "trackio", tmp_path / "trackio")
    ids = json.loads((copy / "trackers.json").read_text())
    p = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--config",
            str(copy / "config.yaml"),
            "--train.run_dir",
            str(copy),
            "--resume",
        ],
        cwd=ROOT,
        env=tracker_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert json.loads((copy / "trackers.json").read_text()) == ids  # the same ids
    assert len(list((copy / "wandb").glob(f"offline-run-*-{ids['wandb']}"))) == 2  # one run, two sessions
    assert {r.run.run_id for r in wandb_records(copy, ids["wandb"]) if r.WhichOneof("record_type") == "run"} == {
        ids["wandb"]
    }
    before, _ = trackio_logged(run.parent / "trackio", "sclslt", ids["trackio"])
    after, _ = trackio_logged(tmp_path / "trackio", "sclslt", ids["trackio"])
    assert len(after) > len(before) and after[: len(before)] == before  # appended to the same run


def test_unknown_or_missing_trackers_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="train.report_to='mlflow'.*'tensorboard'"):
        from_dict({"train": {"report_to": ["mlflow"]}})
    from sclslt.config import load_config  # transformers' spellings: one name, none, all

    assert load_config(None, ["--train.report_to", "trackio"]).train.report_to == ["trackio"]
    assert load_config(None, ["--train.report_to", "none"]).train.report_to == []
    assert load_config(None, ["--train.report_to", "all"]).train.report_to == ["tensorboard", "wandb", "trackio"]
    import sclslt.config as config

    monkeypatch.setitem(config.TRACKER_MODULES, "wandb", "wandb_is_not_installed_here")
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[track\]'"):
        from_dict({"train": {"report_to": ["tensorboard", "wandb"]}})
    assert from_dict({"train": {"report_to": []}}).train.report_to == []
