"""Model construction from config and from local pretrained directories (tiny `save_pretrained` models)."""

import pytest
import torch

from sclslt.config import ModelConfig, from_dict
from sclslt.data.loader import Collate, ShardStream
from sclslt.data.shards import read_manifest
from sclslt.data.text import load_tokenizer, train_tokenizer
from sclslt.model.slt import SLTModel


@pytest.fixture(scope="module")
def tok(tiny_shards, tmp_path_factory):
    texts = [s[4] for s in read_manifest(tiny_shards, "train")["samples"]]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def batch(tiny_shards, tok):
    return Collate(tok)(next(iter(ShardStream(tiny_shards, "dev", 3))))


def test_forward_shapes_and_normalised_embeddings(tiny_cfg_dict, tok, batch):
    torch.manual_seed(0)
    model = SLTModel(from_dict(tiny_cfg_dict).model, tok)
    out = model(batch.frames, batch.frame_mask, batch.input_ids, batch.attention_mask, batch.labels)
    assert out["logits"].shape == (*batch.labels.shape, len(tok))
    for k in ("video_emb", "text_emb"):
        assert torch.allclose(out[k].norm(dim=-1), torch.ones(3), atol=1e-5)
    # padding frames do not change a clip's encoding: the same clip alone vs padded in a batch
    # (with trained-looking norm layers: at init BN maps a zero to zero and hides leaks)
    model.eval()
    g = torch.Generator().manual_seed(5)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm1d):
            mod.bias.data = torch.rand(mod.bias.shape, generator=g) + 0.5
            mod.running_mean = torch.randn(mod.running_mean.shape, generator=g)
    enc_b, mask_b = model.encode_video(batch.frames, batch.frame_mask)
    lengths = batch.frame_mask.sum(1).tolist()
    assert any(n < max(lengths) and n % 2 for n in lengths), "need a padded clip of odd length (pool boundary)"
    for i, n in enumerate(lengths):
        enc_1, mask_1 = model.encode_video(batch.frames[i : i + 1, :n], batch.frame_mask[i : i + 1, :n])
        m = int(mask_1.sum())
        assert torch.equal(mask_b[i, :m], mask_1[0]) and not mask_b[i, m:].any()
        assert torch.allclose(enc_b[i, :m], enc_1[0, :m], atol=1e-5), i


def test_pretrained_backbone_mbart_and_tokenizer_load_from_local_dirs(tmp_path, tok, batch):
    from transformers import MBartConfig, MBartForConditionalGeneration, ResNetConfig, ResNetModel

    torch.manual_seed(1)
    rn = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 12], depths=[1, 1], layer_type="basic"))
    rn.save_pretrained(tmp_path / "resnet")
    mb = MBartForConditionalGeneration(
        MBartConfig(
            vocab_size=len(tok),
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=64,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
            decoder_start_token_id=tok.eos_token_id,
        )
    )
    mb.save_pretrained(tmp_path / "mbart")
    tok.save_pretrained(tmp_path / "tokdir")
    cfg = ModelConfig(
        backbone=str(tmp_path / "resnet"),
        mbart=str(tmp_path / "mbart"),
        tokenizer=str(tmp_path / "tokdir"),
        embed_dim=8,
    )
    tok2 = load_tokenizer(cfg.tokenizer)
    model = SLTModel(cfg, tok2)
    # the pretrained weights arrived, in the backbone, the visual/decoder mBART and the text encoder
    for k, v in rn.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    for k, v in mb.state_dict().items():
        assert torch.equal(model.s2s.state_dict()[k], v), k
    enc_sd = mb.model.encoder.state_dict()
    for k, v in model.text_encoder.state_dict().items():
        assert torch.equal(v, enc_sd[k]), k
    out = model(batch.frames, batch.frame_mask, batch.input_ids, batch.attention_mask, batch.labels)
    assert out["logits"].shape[-1] == len(tok2)


def test_missing_pretrained_name_is_a_clear_error(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="frame backbone.*local path"):
        SLTModel(ModelConfig(backbone=str(tmp_path / "no-such-resnet")), tok)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(tmp_path / "no-such-tokenizer")


def test_beam_one_equals_greedy(tiny_cfg_dict, tok, batch):
    torch.manual_seed(2)
    model = SLTModel(from_dict(tiny_cfg_dict).model, tok).eval()
    beam1 = model.generate(batch.frames, batch.frame_mask, beam=1, max_len=8)
    enc, mask = model.encode_video(batch.frames, batch.frame_mask)
    from transformers.modeling_outputs import BaseModelOutput

    cur = torch.full((3, 1), model.s2s.config.decoder_start_token_id)
    done = torch.zeros(3, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(8):
            logits = model.s2s(
                encoder_outputs=BaseModelOutput(last_hidden_state=enc),
                attention_mask=mask.long(),
                decoder_input_ids=cur,
            ).logits[:, -1]
            nxt = logits.argmax(-1).masked_fill(done, tok.pad_token_id)
            cur = torch.cat([cur, nxt[:, None]], 1)
            done |= nxt == tok.eos_token_id
            if done.all():
                break
    assert tok.batch_decode(beam1, skip_special_tokens=True) == tok.batch_decode(cur, skip_special_tokens=True)
