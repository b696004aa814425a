"""Pretrained pieces without downloads: vocabulary trimming of an mBART-style tokenizer and the matching
remap of a pretrained mBART, the character tokenizer, LoRA (peft), and a pretrained ResNet backbone.

Everything pretrained here is tiny and random, made in the test and saved with `save_pretrained`: a
Unigram (sentencepiece-like) model trained with `tokenizers` on the corpus plus unrelated sentences,
wrapped as mBART-50 and mBART-cc25 tokenizers (their special tokens and language codes), and tiny
`MBartForConditionalGeneration` / `ResNetModel`s.
"""

import hashlib
import json

import pytest
import torch

from sclslt.config import ModelConfig, from_dict
from sclslt.data.loader import Collate, ShardStream
from sclslt.data.shards import read_manifest
from sclslt.data.text import load_tokenizer, make_run_tokenizer
from sclslt.data.vocab import VOCAB_FILE, record_of
from sclslt.model.slt import LORA_TARGETS, SLTModel
from tests.helpers import ROOT, TRAIN_ENV

LANG = "de_DE"
EXTRA = [
    "the quick brown fox jumps over the lazy dog",
    "zebra xylophone jazz quiz",
    "a wizard quietly mixes juice",
    "seven jovial kings vexed the zealous judge",
    "my cup of coffee is hot",
]


@pytest.fixture(scope="module")
def corpus(tiny_shards):
    train = [s[4] for s in read_manifest(tiny_shards, "train")["samples"]]
    dev = [s[4] for s in read_manifest(tiny_shards, "dev")["samples"]]
    return train, dev


def _pieces(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.train_from_iterator(sorted(texts), trainers.UnigramTrainer(vocab_size=160, show_progress=False))
    return [(p, s) for p, s in json.loads(tk.to_str())["model"]["vocab"] if p not in ("<unk>", "<s>", "</s>")]


def _mbart(vocab_size, path, seed):
    from transformers import MBartConfig, MBartForConditionalGeneration

    torch.manual_seed(seed)
    m = MBartForConditionalGeneration(
        MBartConfig(
            vocab_size=vocab_size,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=64,
            dropout=0.0,
            scale_embedding=True,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
        )
    )
    m.final_logits_bias.normal_()  # so that its column selection is checked too
    m.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    """{style: (tokenizer dir, mBART dir)} for mBART-50 ("prefix") and mBART-cc25 ("suffix") layouts."""
    from transformers import MBart50Tokenizer, MBartTokenizer
    from transformers.models.mbart.tokenization_mbart import FAIRSEQ_LANGUAGE_CODES as CODES25
    from transformers.models.mbart50.tokenization_mbart50 import FAIRSEQ_LANGUAGE_CODES as CODES50

    train, dev = corpus
    pieces = _pieces(train + dev + EXTRA)
    head = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    root = tmp_path_factory.mktemp("pretrained")
    out = {}
    for style, cls, codes in (("prefix", MBart50Tokenizer, CODES50), ("suffix", MBartTokenizer, CODES25)):
        tok = cls(vocab=head + pieces + [(c, 0.0) for c in codes] + [("<mask>", 0.0)])
        tok.save_pretrained(root / f"tok-{style}")
        out[style] = (str(root / f"tok-{style}"), _mbart(len(tok), str(root / f"mbart-{style}"), seed=3))
    return out


@pytest.fixture(scope="module")
def trimmed(pretrained, corpus, tmp_path_factory):
    """{style: run tokenizer dir} made by make_run_tokenizer with trimming and LANG."""
    train, dev = corpus
    out = {}
    for style, (tok_dir, _) in pretrained.items():
        d = tmp_path_factory.mktemp(f"run-{style}") / "tokenizer"
        make_run_tokenizer(
            ModelConfig(tokenizer=tok_dir, lang=LANG), train, d, heldout={"dev": dev, "odd": ["jazz quiz zebra"]}
        )
        out[style] = d
    return out


def _orig(tok_dir):
    return load_tokenizer(tok_dir, src_lang=LANG, tgt_lang=LANG)


@pytest.mark.parametrize("style", ["prefix", "suffix"])
def test_trim_keeps_exactly_the_used_ids_and_round_trips(style, pretrained, trimmed, corpus):
    train, _ = corpus
    orig = _orig(pretrained[style][0])
    lang_id = orig.convert_tokens_to_ids(LANG)
    per_text = [orig(t)["input_ids"] for t in train]  # one by one: the brute-force reference
    expected = sorted(set().union(*map(set, per_text)) | set(orig.all_special_ids) | {lang_id})
    tok = load_tokenizer(trimmed[style])
    rec = record_of(tok)
    kept = rec["kept_ids"]
    assert kept == expected and len(tok) == len(kept) < len(orig)
    assert rec == json.loads((trimmed[style] / VOCAB_FILE).read_text())
    assert rec["sha256"] == hashlib.sha256(json.dumps(kept, separators=(",", ":")).encode()).hexdigest()
    assert rec["lang_style"] == style and kept[rec["lang_id"]] == lang_id
    for text, ids in zip(train, per_text):
        new = tok(text)["input_ids"]
        assert [kept[i] for i in new] == ids, text
        assert tok.decode(new, skip_special_tokens=True) == text == orig.decode(ids, skip_special_tokens=True)
        assert (new[0] if style == "prefix" else new[-1]) == rec["lang_id"]
    # the interface the trainer uses
    enc = tok(train[:5], padding=True, truncation=True, max_length=6, return_tensors="pt")
    assert enc["input_ids"].shape == (5, 6) and enc["input_ids"].max() < len(tok)
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [
        kept.index(orig.convert_tokens_to_ids(t)) for t in ("<pad>", "<s>", "</s>", "<unk>")
    ]
    full = tok(train[:5], padding=True, return_tensors="pt")["input_ids"]
    assert tok.batch_decode(full, skip_special_tokens=True) == train[:5]
    # held-out texts: unseen characters become <unk>, counted; training texts never do
    assert rec["heldout_unk"]["odd"]["unk_tokens"] > 0 and rec["train_texts_with_unk"] == 0
    assert tok.unk_token_id not in sum(tok(train)["input_ids"], [])


def test_trim_is_deterministic_and_the_hash_follows_the_texts(pretrained, corpus, tmp_path):
    train, _ = corpus
    tok_dir = pretrained["prefix"][0]
    cfg = ModelConfig(tokenizer=tok_dir, lang=LANG)
    a = record_of(make_run_tokenizer(cfg, train, tmp_path / "a"))
    b = record_of(make_run_tokenizer(cfg, list(reversed(train)), tmp_path / "b"))
    c = record_of(make_run_tokenizer(cfg, train[:10], tmp_path / "c"))
    assert a["sha256"] == b["sha256"] and a["vocab_sha256"] == b["vocab_sha256"] and a["kept_ids"] == b["kept_ids"]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert c["sha256"] != a["sha256"] and set(c["kept_ids"]) < set(a["kept_ids"])


def test_trimming_never_prefers_unk_over_kept_pieces():
    """A dropped single-character piece makes `tokenizers` add an <unk> path whose default score
    (lowest kept score - 10) can beat the original segmentation; the trimmer's guard prevents it."""
    from transformers import MBart50Tokenizer
    from transformers.models.mbart50.tokenization_mbart50 import FAIRSEQ_LANGUAGE_CODES as CODES50

    from sclslt.data.vocab import trim_tokenizer

    pieces = [("▁ab", -20.0), ("cd", -20.0), ("▁e", -1.0), ("bc", -2.0), ("d", -2.0), ("▁", -1.0), ("fg", -1.0)]
    pieces += [(c, -50.0) for c in "abcefg"]
    orig = MBart50Tokenizer(
        vocab=[("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
        + pieces
        + [(c, 0.0) for c in CODES50]
        + [("<mask>", 0.0)],
        src_lang=LANG,
        tgt_lang=LANG,
    )
    train = ["abcd", "ebcd", "fg"]
    assert orig.convert_ids_to_tokens(orig("abcd")["input_ids"]) == [LANG, "▁ab", "cd", "</s>"]
    new, rec = trim_tokenizer(orig, train, LANG)
    assert new.convert_ids_to_tokens(new("abcd")["input_ids"]) == [LANG, "▁ab", "cd", "</s>"]
    with pytest.raises(RuntimeError, match="encodes 'abcd'"):  # what it would be without the guard
        trim_tokenizer(orig, train, LANG, unk_guard=False)


def test_untrimmed_pretrained_is_saved_as_is(pretrained, corpus, tmp_path):
    train, _ = corpus
    tok_dir = pretrained["suffix"][0]
    tok = make_run_tokenizer(ModelConfig(tokenizer=tok_dir, lang=LANG, trim_vocab=False), train, tmp_path / "t")
    orig = _orig(tok_dir)
    rec = record_of(tok)
    assert not rec["trimmed"] and rec["kept_ids"] is None and len(tok) == len(orig)
    assert rec["lang_style"] == "suffix" and rec["lang_id"] == orig.convert_tokens_to_ids(LANG)
    assert tok(train[:3])["input_ids"] == orig(train[:3])["input_ids"]
    for d in (tok_dir, pretrained["prefix"][0]):
        with pytest.raises(ValueError, match="model.lang='xx_YY' is not a token"):
            make_run_tokenizer(ModelConfig(tokenizer=d, lang="xx_YY"), train, tmp_path / "bad")
    # no model.lang: the tokenizer's own default code (en_XX) is recorded and followed
    rec = record_of(make_run_tokenizer(ModelConfig(tokenizer=pretrained["prefix"][0]), train, tmp_path / "d"))
    assert rec["lang"] == "en_XX" and rec["lang_style"] == "prefix"


def test_char_tokenizer_round_trips_chinese_and_is_deterministic(tmp_path):
    texts = ["今天 天气 很好", "明天下雨", "北京 欢迎 你", "你好 世界!"]
    cfg = ModelConfig(tokenizer_kind="char")
    tok = make_run_tokenizer(cfg, texts, tmp_path / "a")
    tok2 = make_run_tokenizer(cfg, list(reversed(texts)), tmp_path / "b")
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<s>", "<pad>", "</s>", "<unk>"]
    assert record_of(tok)["vocab_sha256"] == record_of(tok2)["vocab_sha256"]
    assert len(tok) == 4 + len(set("".join(texts)))
    for t in texts:
        ids = tok(t)["input_ids"]
        assert len(ids) == len(t) + 1 and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == t
        assert tok2(t)["input_ids"] == ids
    enc = tok(texts, padding=True, return_tensors="pt")
    assert tok.batch_decode(enc["input_ids"], skip_special_tokens=True) == texts
    assert tok("上海 天气")["input_ids"].count(tok.unk_token_id) == 2  # unseen characters


def _tiny_model_cfg(tiny_cfg_dict, **kw):
    return ModelConfig(**{**from_dict(tiny_cfg_dict).model.__dict__, **kw})


@pytest.fixture(scope="module")
def batches(tiny_shards, trimmed):
    samples = next(iter(ShardStream(tiny_shards, "dev", 3)))
    return {s: Collate(load_tokenizer(d))(samples) for s, d in trimmed.items()}


@pytest.mark.parametrize("style", ["prefix", "suffix"])
def test_trimmed_mbart_equals_the_full_one_on_the_kept_rows(style, pretrained, trimmed, batches, tiny_cfg_dict):
    from transformers import MBartForConditionalGeneration
    from transformers.models.mbart.modeling_mbart import shift_tokens_right

    _, mbart_dir = pretrained[style]
    tok = load_tokenizer(trimmed[style])
    rec = record_of(tok)
    kept = torch.tensor(rec["kept_ids"])
    model = SLTModel(_tiny_model_cfg(tiny_cfg_dict, mbart=mbart_dir, lang=LANG), tok).eval()
    full = MBartForConditionalGeneration.from_pretrained(mbart_dir).eval()
    assert full.final_logits_bias.abs().sum() > 0
    s2s = model.s2s
    assert s2s.config.vocab_size == len(tok) == len(kept)
    assert torch.equal(s2s.model.shared.weight, full.model.shared.weight[kept])
    assert torch.equal(s2s.lm_head.weight, full.lm_head.weight[kept])
    assert s2s.lm_head.weight is s2s.model.shared.weight is s2s.model.decoder.embed_tokens.weight
    assert torch.equal(s2s.final_logits_bias, full.final_logits_bias[:, kept])
    assert torch.equal(model.text_encoder.embed_tokens.weight, full.model.shared.weight[kept])
    b = batches[style]
    new, mask = b.input_ids, b.attention_mask
    old = kept[new]
    with torch.no_grad():
        got = s2s(
            input_ids=new, attention_mask=mask, decoder_input_ids=shift_tokens_right(new, tok.pad_token_id)
        ).logits
        want = full(
            input_ids=old, attention_mask=mask, decoder_input_ids=shift_tokens_right(old, full.config.pad_token_id)
        ).logits[..., kept]
        assert torch.allclose(got, want, atol=1e-5)
        t_got = model.encode_text(new, mask)
        t_want = full.model.encoder(input_ids=old, attention_mask=mask).last_hidden_state
        assert torch.allclose(t_got, t_want, atol=1e-5)
    # special ids and the language convention, in the config and in what generation uses
    g = s2s.generation_config
    assert (
        (g.pad_token_id, g.eos_token_id)
        == (tok.pad_token_id, tok.eos_token_id)
        == (s2s.config.pad_token_id, s2s.config.eos_token_id)
    )
    lang_id = rec["lang_id"]
    if style == "prefix":  # mBART-50: start with </s>, force the language code
        assert g.decoder_start_token_id == tok.eos_token_id and g.forced_bos_token_id == lang_id
    else:  # mBART-cc25: start with the language code
        assert g.decoder_start_token_id == lang_id and g.forced_bos_token_id is None
    # training's decoder input starts with the same token generation starts with (+ the forced one)
    dec_in = shift_tokens_right(b.labels, tok.pad_token_id)
    assert (dec_in[:, 0] == g.decoder_start_token_id).all()
    if style == "prefix":
        assert (dec_in[:, 1] == lang_id).all()
    out = model.generate(b.frames, b.frame_mask, beam=2, max_len=5)
    assert (out[:, 0] == g.decoder_start_token_id).all() and out.max() < len(tok)
    if style == "prefix":
        assert (out[:, 1] == lang_id).all()
    assert len(tok.batch_decode(out, skip_special_tokens=True)) == 3


def test_map_and_checkpoint_mismatch_is_a_clear_error(pretrained, trimmed, tmp_path, tiny_cfg_dict):
    tok = load_tokenizer(trimmed["prefix"])
    small = _mbart(max(record_of(tok)["kept_ids"]) - 5, str(tmp_path / "small-mbart"), seed=0)
    with pytest.raises(ValueError, match=r"tok-prefix.*small-mbart|small-mbart.*tok-prefix"):
        SLTModel(_tiny_model_cfg(tiny_cfg_dict, mbart=small, lang=LANG), tok)
    with pytest.raises(ValueError, match="en_XX"):  # the run's tokenizer was made for another language
        SLTModel(_tiny_model_cfg(tiny_cfg_dict, mbart=pretrained["prefix"][1], lang="en_XX"), tok)


# -- LoRA ---------------------------------------------------------------------------------------
R = 4


@pytest.fixture(scope="module")
def lora_setup(pretrained, trimmed, batches, tiny_cfg_dict):
    tok = load_tokenizer(trimmed["prefix"])
    kw = dict(mbart=pretrained["prefix"][1], lang=LANG, lora_alpha=8.0)
    torch.manual_seed(7)
    base = SLTModel(_tiny_model_cfg(tiny_cfg_dict, **kw), tok)
    torch.manual_seed(7)
    lora = SLTModel(_tiny_model_cfg(tiny_cfg_dict, lora_rank=R, **kw), tok)
    return base, lora, tok, batches["prefix"]


def _run(model, b):
    return model(b.frames, b.frame_mask, b.input_ids, b.attention_mask, b.labels)


def test_lora_wraps_attention_of_visual_encoder_and_decoder_only(lora_setup):
    base, lora, _, _ = lora_setup
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in lora.named_parameters() if ".lora_A." in n}
    expect = {
        n
        for n, m in base.named_modules()
        if n.split(".")[-1] in LORA_TARGETS and n.startswith(("s2s.model.encoder.", "s2s.model.decoder."))
    }
    assert wrapped == expect and len(expect) == 4 * 1 + 8 * 1  # 1 encoder layer, 1 decoder layer (+cross)
    d = base.s2s.config.d_model
    n_lora = sum(p.numel() for n, p in lora.named_parameters() if ".lora_" in n)
    assert n_lora == len(expect) * R * (d + d)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    for n, _ in lora.named_parameters():
        in_wrapped = n.startswith(("s2s.model.encoder.", "s2s.model.decoder."))
        assert lora.frozen_by_design(n) == (in_wrapped and ".lora_" not in n and ".embed_tokens." not in n), n
        assert (n in trainable) == (not lora.frozen_by_design(n)), n
        assert not base.frozen_by_design(n)
    assert "s2s.model.shared.weight" in trainable and "s2s.model.decoder.layers.0.fc1.weight" not in trainable
    assert lora.frozen_by_design("module.s2s.model.decoder.layers.0.self_attn.q_proj.base_layer.weight")
    # LoRA and non-LoRA models hold the same base weights (same seed): names differ by `.base_layer`
    bsd = base.state_dict()
    for k, v in lora.state_dict().items():
        if ".lora_" not in k:
            assert torch.equal(v, bsd[k.replace(".base_layer", "")]), k


def test_lora_starts_as_the_base_model_and_trains_only_what_is_trainable(lora_setup):
    base, lora, tok, b = lora_setup
    import copy

    base, lora = copy.deepcopy(base).eval(), copy.deepcopy(lora)
    lora.eval()
    with torch.no_grad():
        ob, ol = _run(base, b), _run(lora, b)
    for k in ("logits", "video_emb", "text_emb"):
        assert torch.allclose(ob[k], ol[k], atol=1e-6), k
    assert torch.equal(
        base.generate(b.frames, b.frame_mask, beam=2, max_len=6),
        lora.generate(b.frames, b.frame_mask, beam=2, max_len=6),
    )
    lora.train()
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    out = _run(lora, b)
    loss = (
        torch.nn.functional.cross_entropy(out["logits"].flatten(0, 1), b.labels.flatten())
        + (out["video_emb"] * out["text_emb"]).sum()
    )
    loss.backward()
    opt.step()
    changed = {n for n, p in lora.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert changed <= trainable
    assert {n for n in trainable if ".lora_B." in n} <= changed  # B was 0: now it moved
    assert not any(lora.frozen_by_design(n) for n in changed)
    assert any(n.startswith("s2s.model.decoder.") for n in changed)


def test_lora_state_dict_round_trips_with_stable_keys(lora_setup, tiny_cfg_dict, pretrained):
    _, lora, tok, b = lora_setup
    import copy

    src = copy.deepcopy(lora)
    with torch.no_grad():
        for n, p in src.named_parameters():
            if ".lora_B." in n:
                p.normal_()  # adapters that do something
    torch.manual_seed(99)  # a stage-2 build: same config, other random init
    other = SLTModel(copy.deepcopy(lora.cfg), tok)
    assert list(other.state_dict()) == list(src.state_dict())
    other.load_state_dict(src.state_dict(), strict=True)
    src.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(_run(src, b)["logits"], _run(other, b)["logits"])
    assert torch.equal(
        src.generate(b.frames, b.frame_mask, beam=3, max_len=6),
        other.generate(b.frames, b.frame_mask, beam=3, max_len=6),
    )


# -- pretrained ResNet ------------------------------------------------------------------------
def test_resnet18_shaped_backbone_loads_and_runs(tmp_path, tiny_cfg_dict, tiny_shards):
    from transformers import ResNetConfig, ResNetModel

    from sclslt.data.text import train_tokenizer

    torch.manual_seed(4)
    rn = ResNetModel(
        ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic")
    )
    rn.save_pretrained(tmp_path / "resnet18")
    texts = [s[4] for s in read_manifest(tiny_shards, "train")["samples"]]
    tok = train_tokenizer(texts, tmp_path / "tok", vocab_size=200)
    model = SLTModel(_tiny_model_cfg(tiny_cfg_dict, backbone=str(tmp_path / "resnet18")), tok).eval()
    assert model.temporal[0].conv.in_channels == 512
    assert torch.equal(model.backbone.embedder.embedder.convolution.weight, rn.embedder.embedder.convolution.weight)
    b = Collate(tok)(next(iter(ShardStream(tiny_shards, "dev", 2))))
    with torch.no_grad():
        out = _run(model, b)
    assert out["logits"].shape[:2] == b.labels.shape and torch.isfinite(out["logits"]).all()


def test_missing_local_paths_are_clear_errors(tmp_path, monkeypatch, trimmed, tiny_cfg_dict):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = load_tokenizer(trimmed["prefix"])
    with pytest.raises(FileNotFoundError, match="frame backbone.*no-such-resnet.*local path"):
        SLTModel(_tiny_model_cfg(tiny_cfg_dict, backbone=str(tmp_path / "no-such-resnet")), tok)
    with pytest.raises(FileNotFoundError, match="mBART.*no-such-mbart.*local path"):
        SLTModel(_tiny_model_cfg(tiny_cfg_dict, mbart=str(tmp_path / "no-such-mbart")), tok)
    with pytest.raises(FileNotFoundError, match="tokenizer.*no-such-tok"):
        make_run_tokenizer(ModelConfig(tokenizer=str(tmp_path / "no-such-tok")), ["a b"], tmp_path / "out")


# -- the paper's recipe through the trainer ------------------------------------------------------
def test_pretrained_trimmed_lora_recipe_trains_end_to_end(pretrained, tiny_cfg_dict, tmp_path):
    """A tiny 'pretrained' ResNet + mBART-50 + tokenizer (saved with save_pretrained) through
    launch/train.py: trimmed vocabulary recorded in the run, strict stage transfer, LoRA base weights
    and the frozen text encoder unchanged after both stages, adapters trained."""
    import os
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file
    from transformers import ResNetConfig, ResNetModel

    from sclslt.runtime.checkpoints import load_module_state

    torch.manual_seed(5)
    ResNetModel(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    ).save_pretrained(tmp_path / "resnet")
    tok_dir, mbart_dir = pretrained["prefix"]
    cfg = yaml.safe_load(yaml.safe_dump(tiny_cfg_dict))
    cfg["data"]["synthetic"]["n_train"] = 48
    cfg["model"].update(
        backbone=str(tmp_path / "resnet"),
        mbart=mbart_dir,
        tokenizer=tok_dir,
        lang=LANG,
        lora_rank=4,
        lora_alpha=8,
        max_positions=64,
    )
    cfg["stage1"]["freeze_text_encoder"] = True
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--config", str(tmp_path / "exp.yaml"), "--train.run_dir", str(run)],
        cwd=ROOT,
        env=TRAIN_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 newly initialised, 0 ignored, 0 shape mismatches" in proc.stdout

    record = json.loads((run / "tokenizer" / VOCAB_FILE).read_text())
    results = json.loads((run / "results.json").read_text())
    assert record["trimmed"] and results["tokenizer"]["sha256"] == record["sha256"]
    assert results["tokenizer"]["size"] == record["size"] < len(load_tokenizer(tok_dir))

    base = load_file(os.path.join(mbart_dir, "model.safetensors"))
    s1 = load_module_state(run / "stage1" / "checkpoints")
    s2 = load_module_state(run / "stage2" / "checkpoints")
    for enc in ("encoder", "decoder"):
        for w in ("self_attn.q_proj.weight", "self_attn.out_proj.weight", "fc1.weight"):
            key = f"model.{enc}.layers.0.{w}"
            mine = f"s2s.{key}".replace("q_proj.weight", "q_proj.base_layer.weight").replace(
                "out_proj.weight", "out_proj.base_layer.weight"
            )
            assert torch.equal(s2[mine], base[key].float()), mine  # LoRA keeps the base frozen
        lora_b = f"s2s.model.{enc}.layers.0.self_attn.q_proj.lora_B.default.weight"
        assert s1[lora_b].abs().sum() > 0 and not torch.equal(s1[lora_b], s2[lora_b])  # adapters trained
    te = "text_encoder.layers.0.self_attn.k_proj.weight"
    assert torch.equal(s1[te], base["model.encoder.layers.0.self_attn.k_proj.weight"].float())
    assert torch.equal(s2[te], s1[te])  # frozen in stage 1, contrastive part in stage 2


def test_a_run_exports_as_pretrained_encoders_that_the_recipe_loads(tmp_path):
    """`sclslt export --encoders` on a real (tiny) run: backbone, mBART whose encoder is the run's text
    encoder, and tokenizer, written with save_pretrained; a model configured with them starts from exactly
    those weights (the pretrained start of docs/paper.md), through the loading path of a real recipe."""
    import json

    from sclslt.cli import main
    from sclslt.config import load_config
    from sclslt.runtime.rundir import load_run_model

    fixture = ROOT / "tests" / "fixtures" / "run_before_layout_move"
    assert (
        main(["export", "--encoders", "--run", str(fixture), "--out", str(tmp_path / "pre"), "--stage", "stage1"]) == 0
    )
    info = json.loads((tmp_path / "pre" / "export.json").read_text())
    assert info["tag"] == "step00000002" and not list(tmp_path.glob(".pre.tmp-*"))
    src, tok, cfg = load_run_model(fixture, fixture / "stage1" / "checkpoints")
    cfg = load_config(
        fixture / "config.yaml",
        [
            "--model.backbone",
            str(tmp_path / "pre" / "backbone"),
            "--model.mbart",
            str(tmp_path / "pre" / "mbart"),
            "--model.tokenizer",
            str(tmp_path / "pre" / "tokenizer"),
            "--model.trim_vocab",
            "false",
        ],
    )
    model = SLTModel(cfg.model, load_tokenizer(tmp_path / "pre" / "tokenizer"), cfg.data)
    for name, want in src.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], want), name
    text = {k: v for k, v in src.text_encoder.state_dict().items() if not k.startswith("embed_tokens.")}
    for name, want in text.items():  # both encoders start from the run's text encoder
        assert torch.equal(model.s2s.model.encoder.state_dict()[name], want), name
        assert torch.equal(model.text_encoder.state_dict()[name], want), name
    assert not torch.equal(src.s2s.model.encoder.layers[0].fc1.weight, src.text_encoder.layers[0].fc1.weight)
    for name, want in src.s2s.model.decoder.state_dict().items():
        assert torch.equal(model.s2s.model.decoder.state_dict()[name], want), name
    assert torch.equal(model.s2s.lm_head.weight, src.s2s.lm_head.weight)
    assert len(load_tokenizer(tmp_path / "pre" / "tokenizer")) == len(tok)
