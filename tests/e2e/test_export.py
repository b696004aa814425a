"""`sclslt export`: the tiny trained run's selected checkpoint as a Hugging Face model folder.
Translating from the export gives exactly the run's own test hypotheses (in process, through the Hub
class, and through `sclslt translate --model`); the card's numbers are results.json's; a damaged or
partial folder is a clear error; LoRA adapters merge into weights that compute what the adapters did.
The ZeRO-3 (2-rank) export is in test_distributed.py, beside the run it exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sclslt import SignTranslator  # what users write (the README)
from sclslt.cli import main as cli_main
from sclslt.eval.export import export_run, merge_lora
from sclslt.eval.hub import ExportError


def decode_split(hub: SignTranslator, shards, cfg, split: str = "test", world: int = 1) -> dict:
    """{key: hypothesis} of a split decoded as the run's evaluation did: the same micro-batches, rank slices
    decoded one after the other (`evaluation.evaluate`)."""
    from sclslt.data.loader import Collate, ShardStream, make_loader
    from sclslt.eval.metrics import decode_loader

    g = hub.config["generation"]
    rows = []
    for rank in range(world):
        stream = ShardStream(shards, split, cfg.eval.batch_size, rank=rank, world=world, max_frames=cfg.data.max_frames)
        rows += decode_loader(
            hub.model, make_loader(stream, Collate(hub.tokenizer)), hub.tokenizer, "cpu", g["beam"], g["max_len"]
        )
    return {r["key"]: r["hyp"] for r in rows}


def hypotheses(run: Path) -> dict:
    return {r["key"]: r["hyp"] for r in map(json.loads, (run / "hypotheses.test.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    run, _ = tiny_run
    return export_run(run, tmp_path_factory.mktemp("export") / "model")


def test_the_export_translates_the_test_split_as_the_run_did(tiny_run, tiny_shards, exported):
    from sclslt.config import load_config

    run, hyps = tiny_run
    names = {p.name for p in exported.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "README.md",
        "tokenizer.json",
        "sclslt_vocab.json",
        "sclslt_export.json",
    } <= names
    hub = SignTranslator.from_pretrained(exported)  # the three lines of the README, but the print
    got = decode_split(hub, tiny_shards, load_config(run / "config.yaml"))
    assert got == hypotheses(run) and len(set(got.values())) > 1
    cfg = json.loads((exported / "config.json").read_text())
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen["num_beams"] == cfg["generation"]["beam"] and cfg["lora"] == "none"
    assert cfg["provenance"]["checkpoint"].startswith("stage2/")


def test_translate_from_the_export_equals_translate_from_the_run(tiny_run, clips, exported, capsys):
    run, hyps = tiny_run
    inputs = [str(c[k]) for c in clips for k in ("folder", "mkv")]
    assert cli_main(["translate", "--model", str(exported), *inputs, "--device", "cpu", "--json"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["text"] for o in out] == [hyps[c["key"]] for c in clips for _ in ("folder", "mkv")]
    assert out[0]["checkpoint"].startswith("export of ")
    hub = SignTranslator.from_pretrained(str(exported))
    assert hub.translate(clips[0]["mkv"]) == hyps[clips[0]["key"]]


def test_save_pretrained_writes_a_folder_that_loads_back(exported, tmp_path):
    """What push_to_hub uploads is what save_pretrained writes: every file of the export, a fresh manifest."""
    hub = SignTranslator.from_pretrained(exported)
    hub.save_pretrained(tmp_path / "again")
    back = SignTranslator.from_pretrained(tmp_path / "again")
    names = lambda d: sorted(p.name for p in d.iterdir())
    assert names(tmp_path / "again") == names(exported)
    for f in ("README.md", "train_sentences.json", "sclslt_vocab.json", "config.json"):
        assert (tmp_path / "again" / f).read_bytes() == (exported / f).read_bytes(), f
    a, b = hub.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_card_carries_results_json_numbers(tiny_run, exported):
    """Mutation caught (checked): one manifest's hash recorded for every split."""
    from huggingface_hub import ModelCard

    run, _ = tiny_run
    res = json.loads((run / "results.json").read_text())
    card = ModelCard.load(exported / "README.md")
    got = {e.metric_type: e for e in card.data.eval_results}
    assert got["bleu"].metric_value == round(res["model"]["bleu4"], 2)
    assert got["rouge"].metric_value == round(res["model"]["rouge_l"], 2)
    assert got["chrf"].metric_value == round(res["model"]["chrf"], 2)
    assert got["bleu"].metric_args["signature"] == res["model"]["bleu_signature"]
    assert got["chrf"].metric_args["signature"] == res["model"]["chrf_signature"]
    assert all(e.dataset_split == "test" for e in got.values())
    assert card.data.library_name == "sclslt" and card.data.license == "other" and card.data.language == ["en"]
    text = card.text
    assert f"{res['trivial_baseline']['bleu4']:.2f}" in text and res["trivial_baseline"]["sentence"] in text
    assert res["selected_checkpoint"]["tag"] in text and "GPUs (ranks): 1" in text and "@inproceedings" in text
    # provenance: each split's manifest hashed as it is on disk, no pretrained source (all trained here)
    import hashlib

    from sclslt.config import load_config
    from sclslt.data.corpus import resolve_shards_dir

    shards = resolve_shards_dir(load_config(run / "config.yaml").data)
    want = {sp: hashlib.sha256((shards / f"{sp}.json").read_bytes()).hexdigest() for sp in ("train", "dev", "test")}
    assert res["provenance"]["shards"]["manifest_sha256"] == want and res["provenance"]["pretrained"] == {}
    assert "## Provenance" in text and f"test `{want['test'][:16]}`" in text and "trained from scratch" in text


def test_a_damaged_or_partial_export_is_a_clear_error(tiny_run, exported, tmp_path, clips, capsys):
    def copy(name):
        d = tmp_path / name
        shutil.copytree(exported, d)
        return d

    flipped = copy("flipped")
    w = flipped / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x10
    w.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"model\.safetensors: damaged"):
        SignTranslator.from_pretrained(flipped)
    partial = copy("partial")
    (partial / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match=r"tokenizer\.json: missing"):
        SignTranslator.from_pretrained(partial)
    truncated = copy("truncated")
    (truncated / "config.json").write_text("{")
    with pytest.raises(ExportError, match=r"config\.json: damaged"):
        SignTranslator.from_pretrained(truncated)
    unfinished = copy("unfinished")
    (unfinished / "sclslt_export.json").unlink()
    with pytest.raises(ExportError, match="not a complete sclslt export"):
        SignTranslator.from_pretrained(unfinished)
    assert cli_main(["translate", "--model", str(flipped), str(clips[0]["folder"])]) == 1
    assert "damaged" in capsys.readouterr().err
    # an existing folder is not overwritten silently, nor anything that is not an export, nor the run itself
    with pytest.raises(ExportError, match="exists.*--overwrite to replace"):
        export_run(tiny_run[0], exported)
    other = tmp_path / "somebody_elses"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an sclslt export"):
        export_run(tiny_run[0], other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    for bad in (tiny_run[0], tiny_run[0].parent):
        with pytest.raises(ExportError, match="is the run directory or holds it"):
            export_run(tiny_run[0], bad, overwrite=True)
    assert (tiny_run[0] / "results.json").is_file()
    unfinished_run = tmp_path / "unfinished_run"
    shutil.copytree(tiny_run[0], unfinished_run)
    (unfinished_run / "results.json").unlink()
    with pytest.raises(ExportError, match="has not finished"):
        export_run(unfinished_run, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_merged_lora_weights_compute_what_the_adapters_did(tiny_cfg_dict):
    import tempfile

    from sclslt.config import from_dict
    from sclslt.data.text import train_char_tokenizer
    from sclslt.model.slt import SLTModel

    d = json.loads(json.dumps(tiny_cfg_dict))
    d["model"]["lora_rank"] = 2
    cfg = from_dict(d)
    with tempfile.TemporaryDirectory() as t:
        tok = train_char_tokenizer(["rain in the north", "sun today"], t)
    torch.manual_seed(0)
    model = SLTModel(cfg.model, tok, cfg.data).eval()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # adapters that change the output
    frames = torch.randint(0, 255, (2, 6, 16, 16, 3), dtype=torch.uint8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    ids = torch.randint(4, len(tok), (2, 5))
    args = (frames, mask, ids, torch.ones_like(ids), ids)
    with torch.no_grad():
        want = model(*args)["logits"]
        n = merge_lora(model)
        got = model(*args)["logits"]
    assert n > 0 and not any("lora" in k for k in model.state_dict())
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    plain = SLTModel(
        from_dict({**d, "model": {**d["model"], "lora_rank": 0}}).model, tok, cfg.data, arch=model.architecture()
    ).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(plain(*args)["logits"], want, atol=1e-4)


def test_a_lora_run_exports_as_adapters_or_merged_and_both_translate_as_the_run(
    tiny_cfg_dict, tiny_shards, tmp_path, capsys
):
    """A LoRA run (rank 2, LoRA dropout 0.1) exported with `sclslt export --lora adapter` keeps the peft modules
    (trained, non-zero lora_B) and `--lora merged` none; both load with SignTranslator.from_pretrained, compute
    the same logits and translate the test split as the run did. Mutations caught (checked): the adapter export
    written with lora_rank 0 (its weights do not load), merge_lora that drops the adapters instead of merging
    them (`mod.merge()` removed: other logits)."""
    import subprocess
    import sys

    import yaml

    from sclslt.config import load_config
    from tests.helpers import ROOT, TRAIN_ENV

    d = json.loads(json.dumps(tiny_cfg_dict))
    d["model"].update(lora_rank=2, lora_dropout=0.1)
    d["stage2"]["epochs"] = 2
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(d))
    run = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, "launch/train.py", "--config", str(tmp_path / "lora.yaml"), "--train.run_dir", str(run)],
        cwd=ROOT,
        env=TRAIN_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    hubs = {}
    for mode in ("adapter", "merged"):
        assert cli_main(["export", "--run", str(run), "--out", str(tmp_path / mode), "--lora", mode]) == 0
        hubs[mode] = SignTranslator.from_pretrained(tmp_path / mode).eval()
        assert json.loads((tmp_path / mode / "config.json").read_text())["lora"] == mode
    capsys.readouterr()
    adapters = {k: v for k, v in hubs["adapter"].state_dict().items() if "lora_B" in k}
    assert adapters and any(v.abs().max() > 0 for v in adapters.values())  # trained adapters
    assert not any("lora" in k for k in hubs["merged"].state_dict())
    tok = hubs["adapter"].tokenizer
    torch.manual_seed(0)
    frames = torch.randint(0, 255, (2, 6, 16, 16, 3), dtype=torch.uint8)
    ids = torch.randint(4, len(tok), (2, 5))
    args = (frames, torch.ones(2, 6, dtype=torch.bool), ids, torch.ones_like(ids), ids)
    with torch.no_grad():
        a, m = (hubs[k].model(*args)["logits"] for k in ("adapter", "merged"))
    assert torch.allclose(a, m, atol=1e-4), (a - m).abs().max()
    cfg = load_config(run / "config.yaml")
    for mode, hub in hubs.items():
        assert decode_split(hub, tiny_shards, cfg) == hypotheses(run), mode
