"""`sclslt demo` in a real browser: the server on 127.0.0.1 with the tiny trained run
(conftest.tiny_run), headless Chromium (Debian's `chromium`, installed by tools/setup_env.sh --test)
driven through Playwright. A lossless clip uploaded on the page translates to what `sclslt translate`
says for the same file; a test clip picked from the list shows its reference; bad inputs (not a video, an
empty file, a clip too long) show a message on the page. A screenshot of the page is saved (copied into
$SCLSLT_SCREENSHOT_DIR when that is set: the README's is made so)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from sclslt.cli import main as cli_main
from tests.helpers import ROOT, TRAIN_ENV, write_video

MAX_FRAMES = 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run):
    run, _ = tiny_run
    port = free_port()
    env = {**TRAIN_ENV, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sclslt.cli",
            "demo",
            "--run",
            str(run),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--max-frames",
            str(MAX_FRAMES),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(f"the demo server did not come up: {proc.stdout.read()[-3000:]}")
            time.sleep(1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed (tools/setup_env.sh --test installs it with apt-get)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.goto(server, wait_until="networkidle")
        yield pg
        browser.close()


def submit(page, path=None, test_key=None) -> tuple[str, str]:
    """(translation, info text) after one click of Translate with `path` uploaded or `test_key` picked (an
    uploaded file wins over the list)."""
    if path is not None:
        page.set_input_files("#upload input[type=file]", str(path))
        page.wait_for_function(
            "(stem) => document.querySelector('#upload').innerText.includes(stem)", arg=path.stem, timeout=60000
        )  # the page shows stem and suffix apart
    if test_key is not None:
        box = page.locator("#test_clip input")
        box.click()
        box.fill(test_key)
        page.locator("ul[role=listbox] li", has_text=test_key).first.click()
    page.click("#translate")
    name = path.name if path is not None else test_key  # every result and message names its input
    page.wait_for_function(
        "(name) => { const t = document.querySelector('#info').innerText; "
        "return t.includes(name) && (t.includes('latency') || t.includes('Error')); }",
        arg=name,
        timeout=120000,
    )
    return page.input_value("#translation textarea"), page.inner_text("#info")


def clear_upload(page) -> None:
    page.locator("#upload button[aria-label='Clear']").first.click()


def test_an_uploaded_clip_translates_as_sclslt_translate_says(tiny_run, clips, page, capsys, tmp_path):
    run, hyps = tiny_run
    c = clips[0]
    assert cli_main(["translate", "--run", str(run), str(c["mkv"]), "--device", "cpu", "--json"]) == 0
    want = json.loads(capsys.readouterr().out)["text"]
    text, info = submit(page, path=c["mkv"])
    assert text == want == hyps[c["key"]] and want
    assert f"{c['frames'].shape[0]} frames used" in info and "latency" in info
    assert page.locator("#frames img").count() >= 1  # the frames the model used
    rows = page.inner_text("#neighbours")
    assert rows.count("\n") >= 5 and "similarity" in rows  # five nearest training sentences
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("SCLSLT_SCREENSHOT_DIR"):
        shutil.copy(shot, os.environ["SCLSLT_SCREENSHOT_DIR"])
    clear_upload(page)


def test_the_nearest_sentences_are_the_five_best_scored_training_sentences(tiny_run, tiny_shards, clips):
    """The page's five nearest training sentences are the five distinct training sentences the contrastive head
    scores highest for the clip, most similar first, where the reference scores the clip as the test split's
    retrieval does (embed_split over the shards, every training sample's text on its own row). Mutations caught
    (checked): topk(largest=False) (the five least similar), a sentence list out of step
    with its features."""

    from sclslt.data.shards import manifest_rows, read_manifest
    from sclslt.eval.demo import Demo
    from sclslt.eval.retrieval import embed_split
    from sclslt.model.heads import get_head

    run, _ = tiny_run
    demo = Demo(run=run, device="cpu", max_frames=MAX_FRAMES)
    model, tok, head = demo.tr.model, demo.tr.tokenizer, get_head(demo.head)
    test = embed_split(model, tiny_shards, "test", tok, "cpu", head=demo.head)
    train = embed_split(model, tiny_shards, "train", tok, "cpu", head=demo.head)
    texts = {r.key: r.text for r in manifest_rows(read_manifest(tiny_shards, "train"))}
    for c in clips[:2]:
        i = test["keys"].index(c["key"])
        video = {k: test[k][i : i + 1] for k in head.columns if k.startswith("video")}
        scores = head.scores(
            {**video, **{k: train[k] for k in head.columns if k.startswith("text")}}, model.cfg.cico_tau
        )[0]
        best = {}
        for key, s in zip(train["keys"], scores.tolist()):
            best[texts[key]] = s
        assert len(best) > 5, "too few distinct sentences to tell the nearest from the rest"
        want = sorted(best.items(), key=lambda kv: -kv[1])[:5]
        got = demo.neighbours(c["frames"])
        assert [g[0] for g in got] == [w[0] for w in want], c["key"]
        assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=2e-4), c["key"]


def test_a_zip_of_frames_translates_as_the_frame_folder(tiny_run, clips, page, tmp_path):
    import zipfile

    run, hyps = tiny_run
    c = clips[0]
    z = tmp_path / "frames.zip"
    with zipfile.ZipFile(z, "w") as f:
        for png in sorted(c["folder"].iterdir()):
            f.write(png, f"clip/{png.name}")
    text, info = submit(page, path=z)
    assert text == hyps[c["key"]] and f"{c['frames'].shape[0]} frames used" in info
    clear_upload(page)
    unsafe = tmp_path / "unsafe.zip"
    with zipfile.ZipFile(unsafe, "w") as f:
        f.writestr("../../escape.png", b"x")
    _, info = submit(page, path=unsafe)
    assert "Error" in info and "unsafe member name" in info and not (tmp_path.parent / "escape.png").exists()
    clear_upload(page)


def test_a_test_clip_picked_from_the_list_shows_its_reference(tiny_run, tiny_shards, clips, page):
    from sclslt.data.shards import manifest_rows, read_manifest

    run, hyps = tiny_run
    key = clips[1]["key"] if len(clips) > 1 else clips[0]["key"]
    ref = {r.key: r.text for r in manifest_rows(read_manifest(tiny_shards, "test"))}[key]
    text, info = submit(page, test_key=key)
    assert text == hyps[key] and f"Reference: {ref}" in info


def test_bad_inputs_are_messages_on_the_page(clips, page, tmp_path):
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("these are not video frames")
    _, info = submit(page, path=not_video)
    assert "Error" in info and "cannot be decoded as a video" in info and "Traceback" not in info
    clear_upload(page)
    empty = tmp_path / "empty.mkv"
    empty.write_bytes(b"")
    _, info = submit(page, path=empty)
    assert "Error" in info and "empty" in info
    clear_upload(page)
    frames = clips[0]["frames"]
    long = write_video(
        tmp_path / "long.mkv", np.concatenate([frames] * (MAX_FRAMES // len(frames) + 1)), "ffv1", "bgr0"
    )
    _, info = submit(page, path=long)
    assert "Error" in info and "longer than this demo takes" in info
