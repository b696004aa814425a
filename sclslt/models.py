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
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import ClipAugment
from .config import DataConfig, ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_pretrained(cls, name: str, what: str):
    try:
        return cls.from_pretrained(name)
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load {what} {name!r}: not a local directory with config + weights and not reachable "
            f"on the hub (offline?). Download it elsewhere and pass its local path. Cause: {e}") from e


def build_backbone(cfg: ModelConfig) -> nn.Module:
    from transformers import ResNetConfig, ResNetModel
    if cfg.backbone:
        return _load_pretrained(ResNetModel, cfg.backbone, "frame backbone")
    rc = ResNetConfig(num_channels=3, embedding_size=cfg.backbone_embedding, hidden_sizes=list(cfg.backbone_hidden),
                      depths=list(cfg.backbone_depths), layer_type="basic")
    return ResNetModel(rc)


def build_mbart(cfg: ModelConfig, tokenizer):
    """(seq2seq model, text encoder), from config or pretrained."""
    from transformers import MBartConfig, MBartForConditionalGeneration
    from transformers.models.mbart.modeling_mbart import MBartEncoder
    if cfg.mbart:
        s2s = _load_pretrained(MBartForConditionalGeneration, cfg.mbart, "mBART")
        text = MBartEncoder(s2s.config)
        text.load_state_dict(s2s.model.encoder.state_dict())
        return s2s, text
    mc = MBartConfig(vocab_size=len(tokenizer), d_model=cfg.d_model, encoder_layers=cfg.layers,
                     decoder_layers=cfg.layers, encoder_attention_heads=cfg.heads,
                     decoder_attention_heads=cfg.heads, encoder_ffn_dim=cfg.ffn, decoder_ffn_dim=cfg.ffn,
                     dropout=cfg.dropout, attention_dropout=0.0, activation_dropout=0.0,
                     max_position_embeddings=cfg.max_positions, scale_embedding=True,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
                     forced_eos_token_id=tokenizer.eos_token_id)
    return MBartForConditionalGeneration(mc), MBartEncoder(mc)


class TemporalBlock(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv1d(dim_in, dim_out, kernel_size=5, padding=2, bias=False)  # BN follows
        self.bn = nn.BatchNorm1d(dim_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        # x (B, C, T), mask (B, T): padded steps are zeroed before the convolution and after the
        # activation (>= 0), so they can reach neither a valid step's convolution nor its max-pool
        m = mask[:, None].to(x.dtype)
        x = F.relu(self.bn(self.conv(x * m))) * m
        x = F.max_pool1d(x, 2, ceil_mode=True)
        mask = F.max_pool1d(mask[:, None].float(), 2, ceil_mode=True)[:, 0] > 0
        return x, mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class SLTModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tokenizer, frames: DataConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.frame_view = ClipAugment(frames or DataConfig())    # crop / training augmentation, on device
        self.backbone = build_backbone(cfg)
        self.s2s, self.text_encoder = build_mbart(cfg, tokenizer)
        d = self.s2s.config.d_model
        feat = self.backbone.config.hidden_sizes[-1]
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

    # -- pieces -----------------------------------------------------------------------------
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=self.cfg.logit_scale_max).squeeze(0)

    def encode_video(self, frames: torch.Tensor, frame_mask: torch.Tensor):
        """uint8 (B, T, H, W, 3) -> visual tokens (B, T', d) and their mask (B, T')."""
        b, t = frame_mask.shape
        dtype = self.video_proj.weight.dtype
        frames = self.frame_view(frames)
        valid = frames[frame_mask]                                   # (N, H, W, 3) valid frames only
        x = valid.permute(0, 3, 1, 2).to(dtype).div_(255.0)
        x = (x - self.pixel_mean.to(dtype)) / self.pixel_std.to(dtype)
        feat = self.backbone(pixel_values=x).pooler_output.flatten(1)   # (N, C)
        seq = feat.new_zeros(b, t, feat.shape[-1])
        seq[frame_mask] = feat
        h, mask = seq.transpose(1, 2), frame_mask
        for block in self.temporal:
            h, mask = block(h, mask)
        h = self.visual_in(h.transpose(1, 2))
        enc = self.s2s.model.encoder(inputs_embeds=h, attention_mask=mask.long()).last_hidden_state
        return enc, mask

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def pooled_embeddings(self, enc, mask, text, text_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked-mean pooled, projected, L2-normalised (video, text) embeddings."""
        v = F.normalize(self.video_proj(masked_mean(enc, mask)), dim=-1)
        t = F.normalize(self.text_proj(masked_mean(text, text_mask.bool())), dim=-1)
        return v, t

    def decode_logits(self, enc, mask, labels) -> torch.Tensor:
        from transformers.models.mbart.modeling_mbart import shift_tokens_right
        dec_in = shift_tokens_right(labels, self.s2s.config.pad_token_id)
        from transformers.modeling_outputs import BaseModelOutput
        out = self.s2s(encoder_outputs=BaseModelOutput(last_hidden_state=enc), attention_mask=mask.long(), decoder_input_ids=dec_in)
        return out.logits

    # -- what a training step needs -----------------------------------------------------------
    def forward(self, frames, frame_mask, input_ids, attention_mask, labels,
                contrastive: bool = True, translation: bool = True) -> dict:
        enc, mask = self.encode_video(frames, frame_mask)
        out = {}
        if translation:
            out["logits"] = self.decode_logits(enc, mask, labels)
        if contrastive:
            text = self.encode_text(input_ids, attention_mask)
            if self.cfg.similarity == "cico":      # token-level features for CiCo
                out["video_tokens"] = F.normalize(self.video_proj(enc), dim=-1)
                out["video_mask"] = mask
                out["text_tokens"] = F.normalize(self.text_proj(text), dim=-1)
                out["text_mask"] = attention_mask.bool()
            else:
                out["video_emb"], out["text_emb"] = self.pooled_embeddings(enc, mask, text, attention_mask)
            out["logit_scale"] = self.logit_scale()
        return out

    @torch.no_grad()
    def generate(self, frames, frame_mask, beam: int = 4, max_len: int = 40) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutput
        enc, mask = self.encode_video(frames, frame_mask)
        return self.s2s.generate(encoder_outputs=BaseModelOutput(last_hidden_state=enc),
                                 attention_mask=mask.long(), num_beams=beam, max_new_tokens=max_len,
                                 do_sample=False, early_stopping=True if beam > 1 else False)
