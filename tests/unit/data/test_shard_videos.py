"""`sclslt shard` (sclslt/data/sharding.py) on tiny fixtures in each corpus's real layout: round trip, bad input,
resumption and determinism."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sclslt.data import sharding as sv  # noqa: E402 - `sclslt shard`
from sclslt.data.loader import GlobalStream, ShardStream
from sclslt.data.shards import encode_frames, iter_shard, read_manifest, tar_bytes, write_split
from sclslt.data.text import normalise_text, sentence_id

SIZE = 8


# ---------------------------------------------------------------------------------------------
# fixture builders


def _img(seed: int, w=12, h=10) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _frames_dir(folder: Path, n: int, seed: int, ext="png", fmt="images{:04d}") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{fmt.format(i + 1)}.{ext}"
        _img(seed * 100 + i).save(p)
        paths.append(p)
    return paths


def _expected(paths, max_frames=0) -> np.ndarray:
    idx = (
        np.arange(len(paths))
        if not max_frames or len(paths) <= max_frames
        else np.linspace(0, len(paths) - 1, max_frames).round().astype(int)
    )
    return np.stack([np.asarray(Image.open(paths[i]).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)) for i in idx])


def _mp4(path: Path, n: int, rate: int = 10):
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        st = c.add_stream("mpeg4", rate=rate)
        st.width, st.height, st.pix_fmt = 16, 16, "yuv420p"
        for i in range(n):
            arr = np.full((16, 16, 3), (i * 12) % 256, np.uint8)
            for pkt in st.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)


PHX = [
    ("01April_2010_Thursday_heute-6694", "Signer04", "und nun die wettervorhersage für morgen  ."),
    ("01April_2010_Thursday_tagesschau-1", "Signer01", "Im Norden regnet es"),
    ("02April_2010_Friday_heute-1", "Signer04", "und nun die wettervorhersage für morgen ."),
    ("03May_2011_Tuesday_tagesschau-5", "Signer08", "es bleibt trocken"),
    ("04June_2010_Friday_tagesschau-2", "Signer05", "tschüss"),
]


def make_phoenix(root: Path, n_train=5) -> Path:
    ann = root / "annotations" / "manual"
    ann.mkdir(parents=True)
    for split, rows in (("train", PHX[:n_train]), ("dev", PHX[:2])):
        lines = ["name|video|start|end|speaker|orth|translation"]
        for j, (name, spk, text) in enumerate(rows):
            _frames_dir(root / "features" / "fullFrame-210x260px" / split / name, 3 + j % 4, 7 * j + len(split))
            lines.append(f"{name}|{name}/1/*.png|-1|-1|{spk}|GLOSS A B|{text}")
        (ann / f"PHOENIX-2014-T.{split}.corpus.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def make_gfslt(root: Path) -> Path:
    labels = {}
    for j, (name, _, text) in enumerate(PHX[:3]):
        paths = _frames_dir(root / "features" / "fullFrame-210x260px" / "train" / name, 4 + j, j)
        labels[f"train/{name}"] = {
            "name": name,
            "gloss": "A B",
            "text": text,
            "length": len(paths),
            "imgs_path": [f"train/{name}/{p.name}" for p in paths],
        }
    with gzip.open(root / "labels.train", "wb") as f:
        pickle.dump(labels, f)
    return root


def make_csl(root: Path, lengths=None) -> Path:
    names = ["S000000_P0000_T00", "S000001_P0001_T00", "S000002_P0008_T00"]
    texts = [["他", "的", "同", "学", "是", "警", "察"], ["我", "很", "高", "兴"], ["今", "天", "下", "雨"]]
    info = []
    for j, name in enumerate(names):
        n = 3 + j
        _frames_dir(root / "sentence" / "frames_512x512" / name, n, 50 + j, "jpg", "{:06d}")
        info.append(
            {
                "name": name,
                "length": (lengths or {}).get(name, n),
                "label_gloss": ["X"],
                "label_char": texts[j],
                "label_word": ["".join(texts[j])],
                "signer": j % 2,
            }
        )
    lab = root / "sentence_label"
    lab.mkdir(parents=True)
    with open(lab / "csl2020ct_v2.pkl", "wb") as f:
        pickle.dump({"info": info, "gloss_map": ["X"]}, f)
    (lab / "split_1.txt").write_text(
        "name|split\n" + "\n".join(f"{n}|{'dev' if j == 2 else 'train'}" for j, n in enumerate(names)) + "\n"
    )
    return root


def make_how2sign(root: Path) -> Path:
    _mp4(root / "raw_videos" / "vidA.mp4", 20)  # a whole video: times honoured
    _mp4(root / "sentence_level" / "train" / "rgb_front" / "clipB_1-rgb_front.mp4", 6)  # a sentence clip
    rows = [
        ["vidA_id", "vidA", "s1", "vidA_0-rgb_front", "0.5", "1.5", "And I call them decorative elements."],
        ["vidB_id", "vidB", "s2", "clipB_1-rgb_front", "0", "9", "So, that's it."],
    ]
    with open(root / "how2sign_realigned_train.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(
            ["VIDEO_ID", "VIDEO_NAME", "SENTENCE_ID", "SENTENCE_NAME", "START_REALIGNED", "END_REALIGNED", "SENTENCE"]
        )
        w.writerows(rows)
    return root


def run(*args) -> int:
    return sv.main([*map(str, args), "--size", str(SIZE), "--no-progress"])


def _all(out: Path, split: str) -> list[dict]:
    man = read_manifest(out, split)
    return [s for sh in man["shards"] for s in iter_shard(out / sh["name"])]


def _tars(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


# ---------------------------------------------------------------------------------------------
# layouts: round trip


def test_phoenix_csv_round_trip(tmp_path):
    root, out = make_phoenix(tmp_path / "PHOENIX-2014-T"), tmp_path / "out"
    assert (
        run(
            "--layout",
            "phoenix2014t",
            "--root",
            root,
            "--out",
            out,
            "--split",
            "train,dev",
            "--max-frames",
            "4",
            "--shard-size",
            "0.002",
        )
        == 0
    )
    man = read_manifest(out, "train")
    assert man["num_samples"] == 5 and man["frame_shape"] == [SIZE, SIZE, 3] and len(man["shards"]) > 1
    assert man["options"]["layout"] == "phoenix2014t" and man["options"]["max_frames"] == 4
    for sh in man["shards"]:
        assert hashlib.sha256((out / sh["name"]).read_bytes()).hexdigest() == sh["sha256"]
        assert (out / sh["name"]).stat().st_size <= 2000 or sh["num_samples"] == 1
    got = _all(out, "train")
    assert [g["key"] for g in got] == [n for n, _, _ in PHX]
    for g, (name, spk, text) in zip(got, PHX):
        folder = root / "features" / "fullFrame-210x260px" / "train" / name
        np.testing.assert_array_equal(g["frames"], _expected(sorted(folder.glob("*.png")), 4))
        m = g["meta"]
        assert m["original_text"] == text and m["text"] == normalise_text(text)
        assert m["sentence_id"] == sentence_id(text) and m["signer"] == spk
        assert m["num_frames"] == len(g["frames"]) <= 4 and m["source"].endswith(f"train/{name}")
    # identical sentences (modulo spacing) share a sentence id
    assert got[0]["meta"]["sentence_id"] == got[2]["meta"]["sentence_id"]
    # the training loader reads them
    batches = list(ShardStream(out, "dev", 1))
    assert [b[0]["key"] for b in batches] == [n for n, _, _ in PHX[:2]]
    keys = [r[0] for r in read_manifest(out, "train")["samples"]]
    assert [[s["key"] for s in b] for b in GlobalStream(out, "train", [keys[:2], keys[2:4]])] == [keys[:2], keys[2:4]]
    assert (out / "train.progress.jsonl").is_file() and not (out / ".train.work").exists()


def test_gfslt_labels(tmp_path):
    root, out = make_gfslt(tmp_path / "ph"), tmp_path / "out"
    assert run("--layout", "phoenix2014t", "--root", root, "--out", out, "--split", "train") == 0
    got = _all(out, "train")
    assert sorted(g["key"] for g in got) == sorted(n for n, _, _ in PHX[:3])
    for g in got:
        assert g["frames"].shape == (g["meta"]["source_frames"], SIZE, SIZE, 3)
        assert g["meta"]["original_text"] in [t for _, _, t in PHX]


def test_csl_daily(tmp_path):
    root, out = make_csl(tmp_path / "csl"), tmp_path / "out"
    assert run("--layout", "csl-daily", "--root", root, "--out", out, "--split", "train", "--split", "dev") == 0
    train, dev = _all(out, "train"), _all(out, "dev")
    assert [g["key"] for g in train] == ["S000000_P0000_T00", "S000001_P0001_T00"]
    assert train[0]["meta"]["original_text"] == "他的同学是警察" and train[1]["meta"]["signer"] == "1"
    assert [len(g["frames"]) for g in train + dev] == [3, 4, 5]
    frames = sorted((root / "sentence" / "frames_512x512" / "S000002_P0008_T00").glob("*.jpg"))
    np.testing.assert_array_equal(dev[0]["frames"], _expected(frames))


def test_how2sign_times_and_fps(tmp_path):
    root, out = make_how2sign(tmp_path / "h2s"), tmp_path / "out"
    assert run("--layout", "how2sign", "--root", root, "--out", out, "--split", "train") == 0
    a, b = _all(out, "train")
    assert a["key"] == "vidA_0-rgb_front" and len(a["frames"]) == 10  # 0.5 s .. 1.5 s at 10 fps
    assert a["meta"]["start"] == 0.5 and a["meta"]["original_text"] == "And I call them decorative elements."
    assert b["key"] == "clipB_1-rgb_front" and len(b["frames"]) == 6  # a sentence clip, whole
    # the decoded frames are the right ones: frame i has grey level 12 i (lossy codec: approximately)
    assert abs(int(a["frames"][0].mean()) - 60) <= 6 and abs(int(a["frames"][-1].mean()) - 168) <= 6
    out2 = tmp_path / "out5"
    assert (
        run(
            "--layout", "how2sign", "--root", root, "--out", out2, "--split", "train", "--fps", "5", "--max-frames", "3"
        )
        == 0
    )
    a5, b5 = _all(out2, "train")
    assert len(a5["frames"]) == 3 and len(b5["frames"]) == 3


def test_manifest_csv_and_jsonl(tmp_path):
    d = tmp_path / "mine"
    _frames_dir(d / "clips" / "one", 3, 1)
    _mp4(d / "vids" / "two.mp4", 5)
    with open(d / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "text", "split", "signer"])
        w.writerow(["clips/one", "Hello  World", "train", "ann"])
        w.writerow(["vids/two.mp4", "second, with comma", "train", "bob"])
        w.writerow(["vids/two.mp4", "in dev", "dev", ""])
    assert run("--layout", "manifest", "--root", d, "--out", tmp_path / "o1", "--split", "train") == 0
    got = _all(tmp_path / "o1", "train")
    assert [(g["key"], g["meta"]["original_text"], g["meta"]["signer"], len(g["frames"])) for g in got] == [
        ("clips_one", "Hello  World", "ann", 3),
        ("vids_two", "second, with comma", "bob", 5),
    ]
    (d / "m.jsonl").write_text(json.dumps({"path": "vids/two.mp4", "text": "jsonl", "key": "k1"}) + "\n")
    assert run("--layout", "manifest", "--root", d / "m.jsonl", "--out", tmp_path / "o2", "--split", "train") == 0
    assert [g["key"] for g in _all(tmp_path / "o2", "train")] == ["k1"]


# ---------------------------------------------------------------------------------------------
# bad input


def _bad_corpus(d: Path) -> Path:
    _frames_dir(d / "good1", 3, 1)
    _frames_dir(d / "good2", 4, 2)
    (d / "unreadable").mkdir()
    _frames_dir(d / "unreadable", 3, 3)
    (d / "unreadable" / "images0002.png").write_bytes(b"not a png at all")
    (d / "empty").mkdir()
    _mp4(d / "v.mp4", 5)
    rows = [
        {"path": "good1", "text": "fine one"},
        {"path": "unreadable", "text": "broken frame"},
        {"path": "empty", "text": "no frames"},
        {"path": "good2", "text": "  "},
        {"path": "missing", "text": "not there"},
        {"path": "v.mp4", "text": "past the end", "start": 5, "end": 6},
        {"path": "good2", "text": "fine two"},
    ]
    (d / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_bad_input_skipped_and_listed(tmp_path):
    d, out = _bad_corpus(tmp_path / "c"), tmp_path / "out"
    assert run("--layout", "manifest", "--root", d, "--out", out, "--split", "train", "--skip-bad") == 0
    # 'good2' appears twice (empty text, then fine): same key -> both reported
    bad = [json.loads(x) for x in (out / "train.bad.jsonl").read_text().splitlines()]
    assert [b["key"] for b in bad] == ["unreadable", "empty", "good2", "missing", "v", "good2"]
    assert any("unreadable frame" in b["reason"] and "images0002.png" in b["reason"] for b in bad)
    assert any(b["key"] == "empty" and "zero frames" in b["reason"] for b in bad)
    assert any(b["key"] == "missing" and "missing" in b["reason"] for b in bad)
    assert any(b["key"] == "v" and "zero frames" in b["reason"] and "between 5.0s and 6.0s" in b["reason"] for b in bad)
    assert [b["reason"] for b in bad if b["key"] == "good2"] == ["empty text", "duplicate key 'good2' (2 items)"]
    man = read_manifest(out, "train")
    assert man["num_samples"] == 1 and man["num_bad"] == 6
    assert [g["key"] for g in _all(out, "train")] == ["good1"]


def test_bad_input_stops_without_publishing(tmp_path, capsys):
    d, out = _bad_corpus(tmp_path / "c"), tmp_path / "out"
    assert run("--layout", "manifest", "--root", d, "--out", out, "--split", "train") == 2
    err = capsys.readouterr().err
    for key in ("empty", "missing", "good2"):  # annotation-level problems: all listed at once
        assert key in err
    assert "empty text" in err and str(d / "missing") in err
    assert not (out / "train.json").exists() and not list(out.glob("*.tar"))
    # only a decode-time problem left: stops at it, names it, publishes nothing
    rows = [json.loads(x) for x in (d / "manifest.jsonl").read_text().splitlines()]
    (d / "manifest.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows if r["path"] in ("good1", "unreadable"))
    )
    assert run("--layout", "manifest", "--root", d, "--out", out, "--split", "train") == 2
    err = capsys.readouterr().err
    assert "unreadable (unreadable)" in err and "images0002.png" in err
    assert not (out / "train.json").exists() and not list(out.glob("*.tar"))


def test_mismatched_counts(tmp_path, capsys):
    root = make_gfslt(tmp_path / "ph")
    with gzip.open(root / "labels.train") as f:
        labels = pickle.load(f)
    labels[f"train/{PHX[1][0]}"]["length"] += 1
    labels[f"train/{PHX[2][0]}"]["imgs_path"].append(f"train/{PHX[2][0]}/images0099.png")
    labels[f"train/{PHX[2][0]}"]["length"] += 1
    with gzip.open(root / "labels.train", "wb") as f:
        pickle.dump(labels, f)
    assert run("--layout", "phoenix2014t", "--root", root, "--out", tmp_path / "o", "--split", "train") == 2
    err = capsys.readouterr().err
    assert f"{PHX[1][0]}" in err and "mismatched counts" in err and "images0099.png" in err
    assert (
        run("--layout", "phoenix2014t", "--root", root, "--out", tmp_path / "o", "--split", "train", "--skip-bad") == 0
    )
    assert [g["key"] for g in _all(tmp_path / "o", "train")] == [PHX[0][0]]
    csl = make_csl(tmp_path / "csl", lengths={"S000001_P0001_T00": 9})
    assert run("--layout", "csl-daily", "--root", csl, "--out", tmp_path / "oc", "--split", "train") == 2
    assert "S000001_P0001_T00" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# resumption and determinism


def test_resume_skips_verified_shards(tmp_path, monkeypatch):
    root = make_phoenix(tmp_path / "ph")
    ref = tmp_path / "ref"
    opts = ["--layout", "phoenix2014t", "--root", root, "--split", "train", "--samples-per-shard", "2"]
    assert run(*opts, "--out", ref) == 0
    assert len(read_manifest(ref, "train")["shards"]) == 3

    calls = []
    real = sv.decode_item
    monkeypatch.setattr(sv, "decode_item", lambda it, *a: calls.append(it.key) or real(it, *a))
    # an interrupted run: the 4th clip has a broken frame -> shard 0 and 1 finished, nothing published
    bad_png = next((root / "features" / "fullFrame-210x260px" / "train" / PHX[3][0]).glob("*.png"))
    good = bad_png.read_bytes()
    bad_png.write_bytes(b"garbage")
    out = tmp_path / "out"
    assert run(*opts, "--out", out) == 2
    assert not (out / "train.json").exists() and len(list((out / ".train.work").glob("*.tar"))) == 1
    bad_png.write_bytes(good)
    calls.clear()
    assert run(*opts, "--out", out) == 0
    assert calls == [n for n, _, _ in PHX[2:]]  # shard 0 (items 0, 1) was not decoded again
    assert _tars(out) == _tars(ref)
    assert read_manifest(out, "train")["samples"] == read_manifest(ref, "train")["samples"]
    # a rerun of a finished split decodes nothing and changes nothing
    calls.clear()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert run(*opts, "--out", out) == 0
    assert calls == [] and {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    # a damaged shard fails its sha256: it and the ones after it are rebuilt, identically
    (out / "train-000001.tar").write_bytes(b"x")
    calls.clear()
    assert run(*opts, "--out", out) == 0
    assert calls == [n for n, _, _ in PHX[2:]] and _tars(out) == _tars(ref)
    # different options: nothing is reused
    calls.clear()
    assert run(*opts, "--out", out, "--max-frames", "2") == 0
    assert len(calls) == 5 and max(len(g["frames"]) for g in _all(out, "train")) == 2


def test_same_output_with_1_and_2_workers(tmp_path):
    root = make_phoenix(tmp_path / "ph")
    opts = ["--layout", "phoenix2014t", "--root", root, "--split", "train", "--shard-size", "0.003"]
    assert run(*opts, "--out", tmp_path / "w1", "--workers", "1") == 0
    assert run(*opts, "--out", tmp_path / "w2", "--workers", "2") == 0
    a, b = _tars(tmp_path / "w1"), _tars(tmp_path / "w2")
    assert len(a) > 1 and a == b
    assert (tmp_path / "w1" / "train.json").read_bytes() == (tmp_path / "w2" / "train.json").read_bytes()


def test_write_split_byte_bound_keeps_count_bound(tmp_path):
    rng = np.random.default_rng(0)
    samples = [
        {"key": f"k{i}", "frames": rng.integers(0, 256, (4, 6, 5, 3), dtype=np.uint8), "text": "t"} for i in range(10)
    ]
    man = write_split(iter(samples), tmp_path / "a", "train", samples_per_shard=3)
    assert [s["num_samples"] for s in man["shards"]] == [3, 3, 3, 1]
    bound = tar_bytes([600, 300] * 2)
    man = write_split(iter(samples), tmp_path / "b", "train", samples_per_shard=0, max_shard_bytes=bound)
    assert all((tmp_path / "b" / s["name"]).stat().st_size <= bound for s in man["shards"])
    assert sum(s["num_samples"] for s in man["shards"]) == 10 and len(man["shards"]) >= 3
    for sh in man["shards"]:
        assert (tmp_path / "b" / sh["name"]).stat().st_size == tar_bytes(
            [
                m
                for s in iter_shard(tmp_path / "b" / sh["name"])
                for m in (
                    len(encode_frames(s["frames"])),
                    len(json.dumps(s["meta"], ensure_ascii=False, sort_keys=True).encode()),
                )
            ]
        )


def test_format_option_is_recorded_and_read_back(tmp_path):
    root = make_phoenix(tmp_path / "PHOENIX-2014-T")
    raw, zst = tmp_path / "raw", tmp_path / "zst"
    assert run("--layout", "phoenix2014t", "--root", root, "--out", raw, "--split", "train") == 0
    assert run("--layout", "phoenix2014t", "--root", root, "--out", zst, "--split", "train", "--format", "npy.zst") == 0
    man = read_manifest(zst, "train")
    assert man["format"] == "npy.zst" and man["options"]["format"] == "npy.zst"
    a = [b[0] for b in ShardStream(raw, "train", 1)]
    z = [b[0] for b in ShardStream(zst, "train", 1)]
    assert [s["key"] for s in a] == [s["key"] for s in z]
    assert all(np.array_equal(x["frames"], y["frames"]) for x, y in zip(a, z))  # lossless


def make_captions(root: Path) -> Path:
    """YouTube-ASL style: long videos with WebVTT / SRT captions beside them, and a splits file."""
    _mp4(root / "channel1" / "vidA.mp4", 30)  # 3 s at 10 fps: frame i has grey 12 i
    _mp4(root / "channel2" / "vidB.mp4", 20)
    (root / "channel1" / "vidA.en.vtt").write_text(
        "WEBVTT\n\n00:00:00.500 --> 00:00:01.500\nHello there,\nfriends.\n\n"
        "00:00:01.500 --> 00:00:02.500\nHow are you?\n\n00:00:02.500 --> 00:00:02.000\nbackwards\n",
        encoding="utf-8",
    )
    (root / "channel2" / "vidB.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nGood morning.\n", encoding="utf-8")
    (root / "orphan.vtt").write_text("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\nno video\n", encoding="utf-8")
    (root / "splits.json").write_text(json.dumps({"train": ["vidA", "orphan"], "dev": ["vidB"]}))
    return root


def test_captions_layout_cuts_clips_by_time(tmp_path):
    root, out = make_captions(tmp_path / "yt"), tmp_path / "out"
    assert run("--layout", "captions", "--root", root, "--out", out, "--split", "train", "--skip-bad") == 0
    a, b = _all(out, "train")
    assert [a["key"], b["key"]] == ["vidA_00001", "vidA_00002"]
    assert a["meta"]["original_text"] == "Hello there, friends." and b["meta"]["original_text"] == "How are you?"
    assert len(a["frames"]) == 10 and len(b["frames"]) == 10  # 0.5-1.5 s and 1.5-2.5 s at 10 fps
    assert abs(int(a["frames"][0].mean()) - 60) <= 6 and abs(int(b["frames"][0].mean()) - 180) <= 6
    bad = {x["key"]: x["reason"] for x in map(json.loads, (out / "train.bad.jsonl").read_text().splitlines())}
    assert "bad times" in bad["vidA_00003"] and "vidA.en.vtt" in bad["vidA_00003"]
    assert "no video orphan" in bad["orphan_00001"]
    assert run("--layout", "captions", "--root", root, "--out", out, "--split", "dev") == 0
    (c,) = _all(out, "dev")
    assert c["key"] == "vidB_00001" and c["meta"]["original_text"] == "Good morning." and len(c["frames"]) == 10


class _Evil:
    """A pickle that runs code when it is loaded (here: makes a directory)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("layout", ["phoenix2014t", "csl-daily"])
def test_annotation_pickles_are_read_as_data_only(tmp_path, capsys, layout):
    """A crafted annotation pickle is refused before it runs, naming the file and the global it asked
    for; the corpora's real formats, numpy values included, still load."""
    from sclslt.data.layouts import read_items
    from sclslt.data.layouts.common import CorpusError

    root = make_gfslt(tmp_path / "ph") if layout == "phoenix2014t" else make_csl(tmp_path / "csl")
    f = root / "labels.train" if layout == "phoenix2014t" else root / "sentence_label" / "csl2020ct_v2.pkl"
    opener = gzip.open if layout == "phoenix2014t" else open
    before = read_items(layout, root, "train")
    with opener(f, "rb") as fh:
        data = pickle.load(fh)
    # numpy values, as the corpora's own pickles carry them, are data
    if layout == "phoenix2014t":
        for v in data.values():
            v["length"] = np.int64(v["length"])
    else:
        for d in data["info"]:
            d["length"], d["label_char"] = np.int64(d["length"]), np.array(d["label_char"])
    with opener(f, "wb") as fh:
        pickle.dump(data, fh)
    assert [(i.key, i.text) for i in read_items(layout, root, "train")] == [(i.key, i.text) for i in before]
    # the same file with one entry that would run code on load
    marker = tmp_path / "ran"
    if layout == "phoenix2014t":
        next(iter(data.values()))["text"] = _Evil(marker)
    else:
        data["info"][0]["signer"] = _Evil(marker)
    with opener(f, "wb") as fh:
        pickle.dump(data, fh)
    with pytest.raises(CorpusError, match=r"refused to unpickle.*(posix|os)\.mkdir") as e:
        read_items(layout, root, "train")
    assert str(f) in str(e.value) and not marker.exists()
    assert run("--layout", layout, "--root", root, "--out", tmp_path / "o", "--split", "train") == 2
    assert "refused to unpickle" in capsys.readouterr().err and not marker.exists()
