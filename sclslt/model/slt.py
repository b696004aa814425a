"""The SLT model: frames -> visual encoder -> (contrastive head, mBART decoder).

- Frame backbone: a ResNet from `transformers` (small config by default; a pretrained one such as
  ResNet-18 loads from a local directory or hub name), run only on valid frames.
- Temporal block: two [Conv1d k5, BN, ReLU, MaxPool 2] blocks as in GFSLT-VLP (time /4).
- Visual transformer = the encoder of an `MBartForConditionalGeneration` fed with `inputs_embeds`,
  so the decoder, LM head and beam search are mBART's own.
- Text encoder: a separate mBART encoder (frozen in stage 1 when configured).
- Contrastive heads: masked mean pooling + linear projection, L2-normalised; a learnable logit
  scale stored as its log, clamped as CLIP does.
ImageNet normalisation happens here, on the device (the loader ships uint8).

Pretrained mBART with the run's tokenizer (`text.make_run_tokenizer`, record in `vocab.py`):
- trimmed vocabulary: the rows of the kept original ids are selected in `shared` (= encoder/decoder
  `embed_tokens`, tied), `lm_head` (tied unless the checkpoint unties it) and `final_logits_bias`;
  `config.vocab_size` and the special ids become the new ones. The text encoder copies the trimmed
  encoder. A kept id beyond the checkpoint's vocabulary is an error naming both.
- target language (`model.lang`, recorded with the tokenizer with its convention):
  mBART-50 ("prefix": target `[lang] X </s>`): decoder start `</s>`, `forced_bos_token_id` = lang;
  mBART-cc25 ("suffix": target `X </s> [lang]`): decoder start = lang, nothing forced.
  In training, `shift_tokens_right` (mBART's: the last non-pad token starts the decoder input) gives
  the same start tokens, so training and generation agree.
LoRA (`model.lora_rank > 0`, peft): adapters on q/k/v/out projections of the visual encoder (the
mBART encoder fed with video) and of the decoder (self- and cross-attention). In those two modules
every other pretrained weight is frozen by design (`frozen_by_design`), except the token embeddings,
which are tied to the LM head and stay trainable (docs/paper.md is silent). Backbone, temporal blocks,
heads and the text encoder are untouched by LoRA.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sclslt.config import DataConfig, ModelConfig, batchnorm_mode
from sclslt.data.loader import frame_layout
from sclslt.model.augment import ClipAugment
from sclslt.model.batchnorm import BatchNorm1d, configure, rows_in_groups
from sclslt.model.heads import get_head
from sclslt.model.masks import causal_mask, key_mask

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # attention projections (Hu et al.); not fc1/fc2
LORA_MODULES = ("s2s.model.encoder.", "s2s.model.decoder.")  # visual encoder and decoder


def _load_pretrained(cls, name: str, what: str):
    from huggingface_hub.errors import HFValidationError

    try:
        return cls.from_pretrained(name, dtype=torch.float32)  # fp32 master weights whatever the file holds
    except (OSError, HFValidationError) as e:
        raise FileNotFoundError(
            f"cannot load {what} {name!r}: not a local directory with config + weights and not reachable "
            f"on the hub (offline?). Download it elsewhere and pass its local path. Cause: {e}"
        ) from e


def build_backbone(cfg: ModelConfig, arch: dict | None = None) -> nn.Module:
    """The frame backbone: from `arch` (a saved ResNetConfig dict: an exported model, weights to follow),
    pretrained `model.backbone`, or built from the config's fields."""
    from transformers import ResNetConfig, ResNetModel

    if arch is not None:
        return ResNetModel(ResNetConfig.from_dict(arch))
    if cfg.backbone:
        return _load_pretrained(ResNetModel, cfg.backbone, "frame backbone")
    rc = ResNetConfig(
        num_channels=3,
        embedding_size=cfg.backbone_embedding,
        hidden_sizes=list(cfg.backbone_hidden),
        depths=list(cfg.backbone_depths),
        layer_type="basic",
    )
    return ResNetModel(rc)


def select_vocab(s2s, kept: list[int], pad_id: int | None = None) -> None:
    """Keep only the rows `kept` (original ids, new id = position) of the token embeddings, the LM head and
    `final_logits_bias`, in place; parameters tied before stay tied."""
    n = len(kept)
    idx = torch.as_tensor(kept, dtype=torch.long)
    fresh: dict[int, nn.Parameter] = {}

    def rows(p: nn.Parameter) -> nn.Parameter:
        if id(p) not in fresh:
            fresh[id(p)] = nn.Parameter(p.detach()[idx.to(p.device)].clone(), requires_grad=p.requires_grad)
        return fresh[id(p)]

    for emb in (s2s.model.shared, s2s.model.encoder.embed_tokens, s2s.model.decoder.embed_tokens):
        emb.weight = rows(emb.weight)
        emb.num_embeddings = n
        emb.padding_idx = pad_id
    s2s.lm_head.weight = rows(s2s.lm_head.weight)
    s2s.lm_head.out_features = n
    s2s.final_logits_bias = s2s.final_logits_bias[:, idx.to(s2s.final_logits_bias.device)].clone()
    s2s.config.vocab_size = n


def _special_ids(tokenizer, rec: dict | None, cfg: ModelConfig) -> dict:
    """pad/bos/eos, decoder start and forced BOS for the tokenizer's ids and target-language convention."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    if pad is None or eos is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} needs a pad and an eos token")
    ids = {"pad": pad, "bos": bos, "eos": eos, "start": eos, "forced_bos": None}
    lang, style, lang_id = (rec or {}).get("lang"), (rec or {}).get("lang_style"), (rec or {}).get("lang_id")
    if cfg.lang and lang and cfg.lang != lang:
        raise ValueError(
            f"model.lang={cfg.lang!r} but the run's tokenizer was made for {lang!r}: "
            f"use the tokenizer's language or make a new run"
        )
    if style == "prefix":  # mBART-50: [lang] X </s>; generation starts with </s> and forces lang
        ids["forced_bos"] = lang_id
    elif style == "suffix":  # mBART-cc25: X </s> [lang]; generation starts with lang
        ids["start"] = lang_id
    return ids


def _set_special_ids(s2s, ids: dict) -> None:
    c = s2s.config
    c.pad_token_id, c.bos_token_id, c.eos_token_id = ids["pad"], ids["bos"], ids["eos"]
    c.decoder_start_token_id = ids["start"]
    g = s2s.generation_config
    g.pad_token_id, g.bos_token_id, g.eos_token_id = ids["pad"], ids["bos"], ids["eos"]
    g.decoder_start_token_id = ids["start"]
    g.forced_eos_token_id = ids["eos"]
    g.forced_bos_token_id = ids["forced_bos"]


def build_mbart(cfg: ModelConfig, tokenizer, arch: dict | None = None):
    """(seq2seq model, text encoder), from config or pretrained (vocabulary remapped to the tokenizer's), or
    from `arch` (a saved MBartConfig dict, vocabulary and special ids included: an exported model)."""
    from transformers import MBartConfig, MBartForConditionalGeneration
    from transformers.models.mbart.modeling_mbart import MBartEncoder

    if arch is not None:
        mc = MBartConfig.from_dict(arch)
        s2s = MBartForConditionalGeneration(mc)
        c = s2s.config
        _set_special_ids(
            s2s,
            {
                "pad": c.pad_token_id,
                "bos": c.bos_token_id,
                "eos": c.eos_token_id,
                "start": c.decoder_start_token_id,
                "forced_bos": arch.get("forced_bos_token_id"),
            },
        )
        return s2s, MBartEncoder(mc)

    from sclslt.data.vocab import record_of

    rec = record_of(tokenizer)
    ids = _special_ids(tokenizer, rec, cfg)
    if cfg.mbart:
        s2s = _load_pretrained(MBartForConditionalGeneration, cfg.mbart, "mBART")
        v = s2s.config.vocab_size
        kept = (rec or {}).get("kept_ids")
        if kept is not None:
            src = rec.get("source") or getattr(tokenizer, "name_or_path", "?")
            if len(kept) != len(tokenizer):
                raise ValueError(
                    f"tokenizer {tokenizer.name_or_path!r} has {len(tokenizer)} tokens but its vocab "
                    f"record keeps {len(kept)} ids of {src!r}"
                )
            if max(kept) >= v:
                raise ValueError(
                    f"the trimmed vocabulary of tokenizer {src!r} keeps original ids up to {max(kept)}, "
                    f"beyond mBART {cfg.mbart!r}'s vocabulary of {v}: the tokenizer and the model "
                    f"do not belong together (set model.tokenizer to the model's own tokenizer)"
                )
            if rec.get("source_size") not in (None, v):
                print(
                    f"sclslt: warning: tokenizer {src!r} had {rec['source_size']} tokens, mBART {cfg.mbart!r} "
                    f"has {v} embedding rows",
                    flush=True,
                )
            select_vocab(s2s, kept, ids["pad"])
        elif len(tokenizer) > v:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has {len(tokenizer)} tokens, "
                f"more than mBART {cfg.mbart!r}'s vocabulary of {v}: they do not belong together"
            )
        _set_special_ids(s2s, ids)
        text = MBartEncoder(s2s.config)
        text.load_state_dict(s2s.model.encoder.state_dict())
        return s2s, text
    mc = MBartConfig(
        vocab_size=len(tokenizer),
        d_model=cfg.d_model,
        encoder_layers=cfg.layers,
        decoder_layers=cfg.layers,
        encoder_attention_heads=cfg.heads,
        decoder_attention_heads=cfg.heads,
        encoder_ffn_dim=cfg.ffn,
        decoder_ffn_dim=cfg.ffn,
        dropout=cfg.dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        max_position_embeddings=cfg.max_positions,
        scale_embedding=True,
        pad_token_id=ids["pad"],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        decoder_start_token_id=ids["start"],
        forced_eos_token_id=ids["eos"],
    )
    s2s = MBartForConditionalGeneration(mc)
    _set_special_ids(s2s, ids)
    return s2s, MBartEncoder(mc)


class TemporalBlock(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv1d(dim_in, dim_out, kernel_size=5, padding=2, bias=False)  # BN follows
        self.bn = BatchNorm1d(dim_out)  # statistics over valid steps of the set model.batchnorm names

    def forward(self, x: torch.Tensor, mask: torch.Tensor, segments=None):
        # x (B, C, T), mask (B, T): padded steps are zeroed before the convolution and after the
        # activation (>= 0), so they can reach neither a valid step's convolution nor its max-pool;
        # segments: the clips' BatchNorm groups (model.batchnorm='group N')
        m = mask[:, None].to(x.dtype)
        x = F.relu(self.bn(self.conv(x * m), mask, segments)) * m
        x = F.max_pool1d(x, 2, ceil_mode=True)
        mask = F.max_pool1d(mask[:, None].float(), 2, ceil_mode=True)[:, 0] > 0
        return x, mask


class SLTModel(nn.Module):
    """The translator: frame backbone, temporal blocks, mBART (visual encoder, decoder), text encoder and the
    contrastive projections. `arch` ({"backbone", "mbart"}: `architecture()` of a model) builds the same
    modules without loading any pretrained file (an exported model, whose weights are loaded next)."""

    def __init__(self, cfg: ModelConfig, tokenizer, frames: DataConfig | None = None, arch: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.frame_view = ClipAugment(frames or DataConfig())  # crop / training augmentation, on device
        arch = arch or {}
        self.backbone = build_backbone(cfg, arch.get("backbone"))
        self.s2s, self.text_encoder = build_mbart(cfg, tokenizer, arch.get("mbart"))
        d = self.s2s.config.d_model
        feat = self.backbone.config.hidden_sizes[-1]  # pooled channels, basic and bottleneck ResNets alike
        if cfg.temporal_downsample:
            self.temporal = nn.ModuleList([TemporalBlock(feat, d), TemporalBlock(d, d)])
            self.visual_in = nn.Identity()
        else:
            self.temporal = nn.ModuleList()
            self.visual_in = nn.Linear(feat, d)
        self.video_proj = nn.Linear(d, cfg.embed_dim)
        self.text_proj = nn.Linear(self.text_encoder.config.d_model, cfg.embed_dim)
        # shape (1,), not a 0-dim tensor: DeepSpeed broadcasts parameters viewed as bytes
        self.log_logit_scale = nn.Parameter(torch.tensor([math.log(cfg.logit_scale_init)]))
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if cfg.lora_rank > 0:
            self._add_lora()
        configure(self, cfg.batchnorm)  # every BatchNorm: the statistics model.batchnorm names
        self.bn_mode, self.bn_group = batchnorm_mode(cfg.batchnorm)
        self.checkpointing = False

    def checkpoint_activations(self) -> None:
        """Keep only region inputs for backward and recompute the rest (torch.utils.checkpoint, non-reentrant,
        random state preserved, so dropout draws the same masks): every mBART layer (visual encoder, decoder,
        text encoder) and the frame backbone in regions of whole BatchNorm groups (`_backbone`)."""
        for m in (self.s2s, self.text_encoder):
            if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.25
                m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.checkpointing = True

    def architecture(self) -> dict:
        """What `SLTModel(..., arch=)` needs to rebuild these modules without their pretrained files."""
        mbart = self.s2s.config.to_dict()
        mbart["forced_bos_token_id"] = self.s2s.generation_config.forced_bos_token_id
        return {"backbone": self.backbone.config.to_dict(), "mbart": mbart}

    # -- LoRA -------------------------------------------------------------------------------
    def _add_lora(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        lc = LoraConfig(
            r=int(self.cfg.lora_rank),
            lora_alpha=self.cfg.lora_alpha,
            lora_dropout=self.cfg.lora_dropout,
            target_modules=list(LORA_TARGETS),
            bias="none",
        )
        inject_adapter_in_model(lc, self.s2s.model.encoder)
        inject_adapter_in_model(lc, self.s2s.model.decoder)
        for name, p in self.named_parameters():  # peft froze the tied embeddings too: our rule decides
            p.requires_grad_(not self.frozen_by_design(name))

    def frozen_by_design(self, name: str) -> bool:
        """True for a parameter that must stay frozen whatever the stage says: with LoRA, every weight of
        the visual encoder and the decoder except the adapters and the (tied) token embeddings."""
        if self.cfg.lora_rank <= 0:
            return False
        for prefix in ("module.", "_orig_mod."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
        if not name.startswith(LORA_MODULES):
            return False
        return not (".lora_" in name or ".embed_tokens." in name)

    # -- pieces -----------------------------------------------------------------------------
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=self.cfg.logit_scale_max).squeeze(0)

    def encode_video(
        self,
        frames: torch.Tensor,
        frame_mask: torch.Tensor,
        draws: torch.Tensor | None = None,
        valid_frames: tuple[torch.Tensor, list] | None = None,
    ):
        """uint8 (B, T, H, W, 3) -> visual tokens (B, T', d) and their mask (B, T'); `draws`: the clips'
        augmentation uniforms (`Batch.draws`); `valid_frames`: (flat indices of the valid frames, frames per
        clip), made on the host by the collate (`Batch.valid_frames`; else found here with one device read)."""
        b, t = frame_mask.shape
        index, lengths = valid_frames if valid_frames is not None else frame_layout(frame_mask)
        dtype = self.video_proj.weight.dtype
        frames = self.frame_view(frames, draws)
        valid = frames.flatten(0, 1).index_select(0, index)  # (N, H, W, 3) valid frames only
        x = valid.permute(0, 3, 1, 2).to(dtype).div_(255.0)
        x = (x - self.pixel_mean.to(dtype)) / self.pixel_std.to(dtype)
        clips = None
        if self.bn_group:  # 'group N': clip i is in group i // N of this micro-batch (whole groups)
            clips = (torch.arange(b, device=frame_mask.device) // self.bn_group, -(-b // self.bn_group))
        feat = self._backbone(x, index // t, lengths, clips)  # (N, C)
        seq = feat.new_zeros(b * t, feat.shape[-1]).index_copy(0, index, feat).view(b, t, -1)
        h, mask = seq.transpose(1, 2), frame_mask
        for block in self.temporal:
            h, mask = block(h, mask, clips)
        h = self.visual_in(h.transpose(1, 2))
        enc = self.s2s.model.encoder(inputs_embeds=h, attention_mask=key_mask(self.s2s, mask, h.dtype))
        return enc.last_hidden_state, mask

    def _backbone(self, x: torch.Tensor, clip_of: torch.Tensor, lengths: list, clips) -> torch.Tensor:
        """Pooled backbone features of the valid frames `x` (clip by clip; `clip_of`: each frame's clip,
        `lengths`: frames per clip). Checkpointed, in regions whose BatchNorm statistics are their own: one clip
        ('frozen'), one group ('group N'), all ('global')."""
        b = len(lengths)

        def run(pixels: torch.Tensor, first: int, last: int, lo: int, hi: int) -> torch.Tensor:
            seg = (None, 0)
            if clips is not None:  # the region's frames in its own groups (it holds whole groups)
                seg = (clip_of[lo:hi] // self.bn_group - first // self.bn_group, -(-(last - first) // self.bn_group))
            with rows_in_groups(*seg):
                return self.backbone(pixel_values=pixels).pooler_output.flatten(1)

        if not (self.checkpointing and self.training and torch.is_grad_enabled()):
            return run(x, 0, b, 0, x.shape[0])
        from torch.utils.checkpoint import checkpoint

        per = {"frozen": 1, "group": self.bn_group, "global": b}[self.bn_mode]
        ends = list(itertools.accumulate(lengths))  # frames before each clip's end (host ints)
        feats, start = [], 0
        for first in range(0, b, per):
            last = min(first + per, b)
            stop = ends[last - 1]
            feats.append(
                checkpoint(run, x[start:stop], first, last, start, stop, use_reentrant=False, preserve_rng_state=True)
            )
            start = stop
        return torch.cat(feats)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = key_mask(self.text_encoder, attention_mask, self.text_encoder.embed_tokens.weight.dtype)
        return self.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state

    def pooled_embeddings(self, enc, mask, text, text_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked-mean pooled, projected, L2-normalised (video, text) embeddings."""
        out = get_head("pooled").features(self, enc, mask, text, text_mask)
        return out["video_emb"], out["text_emb"]

    def decode_logits(self, enc, mask, labels) -> torch.Tensor:
        from transformers.models.mbart.modeling_mbart import shift_tokens_right

        dec_in = shift_tokens_right(labels, self.s2s.config.pad_token_id)
        from transformers.modeling_outputs import BaseModelOutput

        out = self.s2s(
            encoder_outputs=BaseModelOutput(last_hidden_state=enc),
            decoder_input_ids=dec_in,
            attention_mask=key_mask(self.s2s, mask, enc.dtype),
            decoder_attention_mask=causal_mask(self.s2s, dec_in.shape[1], enc.dtype, enc.device),
        )
        return out.logits

    # -- what a training step needs -----------------------------------------------------------
    def forward(
        self,
        frames,
        frame_mask,
        input_ids,
        attention_mask,
        labels,
        contrastive: bool = True,
        translation: bool = True,
        draws: torch.Tensor | None = None,
        valid_frames=None,
    ) -> dict:
        enc, mask = self.encode_video(frames, frame_mask, draws, valid_frames)
        out = {}
        if translation:
            out["logits"] = self.decode_logits(enc, mask, labels)
        if contrastive:
            text = self.encode_text(input_ids, attention_mask)
            out.update(get_head(self.cfg.similarity).features(self, enc, mask, text, attention_mask))
            out["logit_scale"] = self.logit_scale()
        return out

    @torch.no_grad()
    def generate(self, frames, frame_mask, beam: int = 4, max_len: int = 40) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutput

        enc, mask = self.encode_video(frames, frame_mask)
        return self.s2s.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=enc),
            attention_mask=mask.long(),
            num_beams=beam,
            max_new_tokens=max_len,
            do_sample=False,
            early_stopping=True if beam > 1 else False,
        )
