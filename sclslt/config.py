"""Typed experiment configuration: one dataclass per component, YAML files, dotted CLI overrides.

An experiment file only sets values; every field has a default and a docstring-like comment here.
Unknown keys are errors that name the key (a typo must never silently fall back to a default).
The resolved config is written into the run directory and stored in every checkpoint, so a run can
always be reproduced from what it saved.

Batch sizes live here only (global batch per stage); the DeepSpeed JSON holds engine matters.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sclslt.atomic import write_text
from sclslt.registry import REGISTRIES

TRACKER_MODULES = {"wandb": "wandb", "trackio": "trackio"}  # optional trackers -> the module (extra `track`)


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key and the fix."""


@dataclass
class SyntheticConfig:
    """The synthetic sign corpus (the embedded default and the test bed)."""

    seed: int = 1234  # corpus generator seed (corpus is a pure function of this config)
    n_train: int = 1200  # number of training clips
    train_offset: int = 0  # first training clip's sample index (>= another corpus's n_train: disjoint clips)
    n_dev: int = 100
    n_test: int = 150
    frame_size: int = 32  # frames are frame_size x frame_size x 3, uint8
    n_signers: int = 6  # signers vary speed, offset, size, noise and background
    n_templates: int = 300  # distinct sentences in the pool (sampled with Zipf frequencies)
    zipf_a: float = 0.7  # Zipf exponent of sentence frequencies (exact duplicates)
    near_dup_frac: float = 0.3  # fraction of pool sentences that are one-word variants of another
    paraphrase_frac: float = 0.0  # fraction of pool sentences that reword another's meaning (same signs)
    paraphrases_per_meaning: int = 2  # paraphrases of each meaning that has any (family size - 1)
    min_frames_per_sign: int = 3
    max_frames_per_sign: int = 5


@dataclass
class DataConfig:
    """Where shards come from and how they are streamed."""

    corpus: Literal["synthetic", "shards"] = "synthetic"  # "synthetic" (generated + sharded into cache_dir on first
    # use) or "shards"
    shards_dir: str = ""  # directory with {split}-*.tar and {split}.json manifests (corpus: shards)
    cache_dir: str = ""  # synthetic corpus cache; default $SCLSLT_CACHE or ~/.cache/sclslt
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    samples_per_shard: int = 64  # synthetic corpus shard size (uneven last shard on purpose)
    num_workers: int = 0  # data-loader worker processes per rank
    prefetch_factor: int = 2
    read_threads: int = 8  # concurrent clip reads per loader process (random access; hides remote latency)
    max_frames: int = 0  # 0: keep all; else subsample longer clips (random sorted subset in training)
    decode: Literal["auto", "cpu", "device"] = "auto"  # jpg shards: "auto" (on a CUDA device with nvImageCodec, else
    # CPU), "cpu", "device"
    max_bad_fraction: float = 0.01  # unreadable samples are reported and skipped up to this fraction, then an error
    lowercase: bool = True  # text normalisation for training targets and sentence ids
    crop: int = 0  # square crop fed to the model (GFSLT-VLP: 224 of 256); 0 = whole frame
    augment: bool = False  # training-time clip augmentation (one affine per clip), on the device
    aug_prob: float = 0.5  # probability of each of rotate / scale / translate per clip
    aug_rotate: float = 15.0  # degrees, uniform in +-aug_rotate
    aug_scale: list = field(default_factory=lambda: [0.8, 1.2])  # zoom range
    aug_translate: float = 0.1  # fraction of the frame, uniform in +-aug_translate


@dataclass
class ModelConfig:
    """Visual backbone, visual/text transformers and decoder; built from config or loaded pretrained."""

    backbone: str = ""  # "" builds a small ResNet from the fields below; else local dir / hub name
    backbone_embedding: int = 16
    backbone_hidden: list = field(default_factory=lambda: [16, 32, 64])
    backbone_depths: list = field(default_factory=lambda: [1, 1, 1])
    mbart: str = ""  # "" builds mBART from the fields below; else local dir / hub name
    tokenizer: str = ""  # "" trains a tokenizer on the corpus; else local dir / hub name
    d_model: int = 64
    layers: int = 2  # encoder and decoder layers each
    heads: int = 4
    ffn: int = 128
    dropout: float = 0.1
    max_positions: int = 256
    embed_dim: int = 64  # joint embedding size for the contrastive heads
    similarity: str = "pooled"  # the similarity head (sclslt/model/heads.py): pooled embeddings, or cico (token-level,
    # docs/paper.md)
    cico_tau: float = 0.07  # CiCo softmax temperature
    cico_directions: Literal["average", "split"] = "average"  # CiCo training: (i2t + t2i) / 2 both ways, or split: i2t
    # for video->text, t2i for text->video (CiCo's code)
    logit_scale_init: float = 14.285714  # 1 / 0.07, as CLIP
    logit_scale_max: float = 100.0  # clamp of the multiplier, as CLIP
    temporal_downsample: bool = True  # two [Conv1d k5, BN, ReLU, MaxPool 2] blocks (GFSLT-VLP)
    tokenizer_kind: Literal["bpe", "char"] = "bpe"  # no model.tokenizer: "bpe" trained on the corpus, or "char"
    # (Chinese)
    trim_vocab: bool = True  # pretrained mBART: keep only the tokens the training texts use (GFSLT-VLP)
    lang: str = ""  # mBART language code of the target text (de_DE, zh_CN, en_XX), pretrained only
    init_from: str = ""  # a checkpoint dir (<run>/<stage>/checkpoints, latest tag) whose weights start the
    # first stage: a pretrained VLP model (use its run's tokenizer as model.tokenizer)
    lora_rank: int = 0  # > 0: LoRA adapters (peft) on the visual encoder and the decoder (paper: 16)
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    batchnorm: str = "global"  # BatchNorm statistics (sclslt/model/batchnorm.py): "global" (the global batch's; whole
    # shares only), "group N" (fixed groups of N clips of the global batch) or "frozen"


@dataclass
class StageConfig:
    """One training stage; stage 1 = contrastive + joint translation, stage 2 = translation only."""

    enabled: bool = True
    epochs: int = 1
    global_batch: int = 16  # clips per optimizer step summed over ranks (independent of world size)
    micro_batch: int = 0  # clips a rank pushes through the model at once (0: its whole share, global_batch /
    # world); smaller: the share in chunks, the contrastive loss exact by gradient caching
    lr: float = 1e-4
    weight_decay: float = 0.01
    adam_eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    contrastive_weight: float = 1.0
    translation_weight: float = 1.0
    label_smoothing: float = 0.2
    mask_same_sentence: bool = True  # drop same-sentence columns from the softmax (false: GFSLT-VLP's loss)
    mask_close_text: float = 0.0  # > 0: columns whose sentence is this close to the row's leave its softmax too
    # (sclslt/model/close_text.py; no reference run needed)
    mask_close_text_kind: Literal["jaccard", "cosine"] = "jaccard"  # token Jaccard, or the starting text encoder's
    # cosine
    soft_close_text: float = 0.0  # > 0: close columns stay in the softmax as positives sharing this target weight
    freeze_text_encoder: bool = False


@dataclass
class TrainConfig:
    """Things shared by both stages of a run."""

    seed: int = 0
    run_dir: str = "runs/default"
    max_steps: int = 0  # cap on optimizer steps per stage (0 = run all epochs)
    grad_clip: float = 1.0  # written into the DeepSpeed config (0 disables clipping)
    log_every: int = 10
    max_nonfinite: int = 5  # consecutive non-finite losses (each skipped) before the run stops
    activation_checkpointing: bool = False  # recompute activations in the backward instead of keeping them: the
    # backbone in clip groups, every mBART layer (random state preserved; ~1 more forward)
    telemetry_every: int = 50  # GPU utilisation/memory/power/temperature per rank every N steps (0: off)
    timing_every: int = 0  # step-time breakdown (data, h2d, forward, loss, backward, optimizer) every N steps
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPUs, fp32 on CPU; or fp32 / bf16 /
    # fp16
    dist_timeout_s: int = 1800  # a collective waits this long for a stuck or dead rank, then every rank exits
    report_to: list = field(default_factory=lambda: ["tensorboard"])  # trackers (sclslt/runtime/trackers.py):
    # tensorboard, wandb, trackio; none / [] for none, all
    tracker_project: str = "sclslt"  # the wandb / trackio project of the run


@dataclass
class SelectionConfig:
    """How stage-1 global batches are built (Pair Selection, docs/paper.md)."""

    mode: Literal["random", "ps", "self"] = "random"  # random | ps (reference table) | self (the job's own earlier
    # embeddings)
    table: str = ""  # ps: reference table made by `sclslt reference`
    schedule: str = "log"  # curriculum (sclslt/selection/schedules.py): the quantile of Delta vs alpha
    log_base: float = 10.0  # b of the log schedule: q = log(1 + (b - 1) alpha) / log(b)
    pools: int = 1  # canonical pools an epoch is planned in (1: the whole epoch; more: each pool on
    # its own, ranks share them out: for millions of clips; never the GPU count)
    chunk: int = 1  # members added per step at the quantile (1: the paper's exact greedy)
    self_interval: int = 1  # self: epochs between refreshes of the late table (early = stage start)
    table_dtype: Literal["float64", "float32", "float16", "bfloat16"] = "float64"  # ps: a rank's table rows (its pool
    # only) in float64/float32/float16/bfloat16
    separate_close: float = 0.0  # ps/self: q > 0 keeps pairs in the top q of negatives' similarity at BOTH reference
    # checkpoints out of one batch (likely false negatives; sclslt/selection/planner.py)
    allow_same_sentence: bool = False  # true: identical sentences may share a batch (the paper's planner, no id rule)


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end of the stage (and when the dev score improves)
    keep: int = 2  # newest step checkpoints kept per stage
    every_epochs: int = 0  # >0: also keep an `epochNNNN` checkpoint every N epochs (reference runs)


@dataclass
class EvalConfig:
    split: str = "test"
    beam: int = 4
    max_len: int = 40
    batch_size: int = 32
    bleu_tokenize: str = "13a"  # sacrebleu tokenizer: 13a (de/en), zh or char (Chinese)
    retrieval_split: str = "dev"  # video<->text R@1/5/10 after the contrastive stage (same sentence = hit)
    select: Literal["dev_bleu4", "last"] = "dev_bleu4"  # which stage-2 checkpoint is evaluated: best dev BLEU-4, or
    # "last"
    dev_every_epochs: int = 1  # dev decoding period during stage 2 (for select=dev_bleu4)
    patience: int = 0  # > 0: the last stage stops after this many dev decodings without a new best
    # (select=dev_bleu4; results.json says where and why); 0: every epoch is trained


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # the embedded default: sized to finish in minutes on 2 CPU cores (real recipes live in configs/)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(epochs=8, lr=1e-3, warmup_steps=20))
    stage2: StageConfig = field(
        default_factory=lambda: StageConfig(epochs=12, lr=1e-3, warmup_steps=20, contrastive_weight=0.0)
    )
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "Config":
        if self.train.report_to in (["none"], ["all"]):  # transformers' spellings of no tracker / every one
            self.train.report_to = (
                [] if self.train.report_to == ["none"] else list(REGISTRIES["train.report_to"].names())
            )
        for key, names in name_fields(self).items():  # the registries' names and the Literal fields'
            value = getattr(getattr(self, key.split(".")[0]), key.split(".")[1])
            for v in value if isinstance(value, list) else [value]:
                if v not in names:
                    raise ConfigError(f"{key}={v!r}: use one of {', '.join(map(repr, names))}")
        for name in self.train.report_to:  # optional trackers: installed?
            module = TRACKER_MODULES.get(name)
            if module and importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f"train.report_to={name!r} needs {module}, which is not installed: "
                    f"pip install -e '.[track]' (or pip install {module})"
                )
        if self.model.lang and not self.model.tokenizer:
            raise ConfigError(
                f"model.lang={self.model.lang!r} needs a pretrained model.tokenizer (mBART's "
                f"language codes); a tokenizer trained on the corpus has none"
            )
        if self.model.lora_rank < 0:
            raise ConfigError("model.lora_rank must be >= 0 (0: no LoRA)")
        if self.data.corpus == "shards" and not self.data.shards_dir:
            raise ConfigError("data.corpus=shards needs data.shards_dir (made by sclslt shard)")
        sel = self.selection
        if sel.mode == "ps" and not sel.table:
            raise ConfigError("selection.mode=ps needs selection.table (make one with sclslt reference)")
        if sel.pools < 1 or sel.chunk < 1 or sel.self_interval < 1 or sel.log_base <= 1:
            raise ConfigError(
                "selection.pools, selection.chunk and selection.self_interval must be >= 1, selection.log_base > 1"
            )
        if not 0.0 <= sel.separate_close < 1.0:
            raise ConfigError("selection.separate_close is a quantile in [0, 1) (0: off)")
        try:
            mode, group = batchnorm_mode(self.model.batchnorm)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for name in ("stage1", "stage2"):
            st = getattr(self, name)
            if mode == "group" and (st.micro_batch or st.global_batch) % group:
                raise ConfigError(
                    f"model.batchnorm='group {group}' needs whole groups in every micro-batch: "
                    f"{name}.micro_batch (or global_batch) must be a multiple of {group}"
                )
        if self.data.read_threads < 1:
            raise ConfigError("data.read_threads must be >= 1")
        for name in ("stage1", "stage2"):
            st: StageConfig = getattr(self, name)
            if st.global_batch < 1 or st.epochs < 0:
                raise ConfigError(f"{name}.global_batch must be >= 1 and {name}.epochs >= 0")
            if not 0.0 <= st.label_smoothing < 1.0:
                raise ConfigError(f"{name}.label_smoothing must be in [0, 1)")
            if st.mask_close_text < 0 or st.mask_close_text > 1 or not 0.0 <= st.soft_close_text < 1.0:
                raise ConfigError(
                    f"{name}.mask_close_text must be in [0, 1] (a Jaccard or cosine threshold; 0: off) "
                    f"and {name}.soft_close_text in [0, 1)"
                )
            if st.soft_close_text > 0 and st.mask_close_text == 0:
                raise ConfigError(
                    f"{name}.soft_close_text weights the close columns that {name}.mask_close_text "
                    f"finds: set its threshold too"
                )
            if st.micro_batch < 0:
                raise ConfigError(f"{name}.micro_batch must be >= 0 (0: a rank's whole share at once)")
            if st.micro_batch and st.global_batch % st.micro_batch:
                raise ConfigError(
                    f"{name}.micro_batch={st.micro_batch} does not divide {name}.global_batch={st.global_batch}"
                )
            if st.mask_close_text > 0 and not st.mask_same_sentence:
                raise ConfigError(
                    f"{name}.mask_close_text needs {name}.mask_same_sentence (the close pairs are "
                    f"looked up by sentence id)"
                )
        return self


def batchnorm_mode(spec: str) -> tuple[str, int]:
    """model.batchnorm: "global" | "frozen" | "group N" -> (mode, N); N = 0 except for groups."""
    parts = str(spec).split()
    if len(parts) == 1 and parts[0] in ("global", "frozen"):
        return parts[0], 0
    if len(parts) == 2 and parts[0] == "group" and parts[1].isdigit() and int(parts[1]) > 0:
        return "group", int(parts[1])
    raise ValueError(
        f"model.batchnorm={spec!r}: use 'global' (the global batch's statistics), 'group N' (fixed "
        f"groups of N clips, e.g. 'group 2') or 'frozen' (running statistics)"
    )


def micro_batch(cfg: "Config", stage: str, world: int) -> int:
    """The clips a rank pushes through the model at once in `stage` at `world` ranks; a clear error where the
    global batch does not split into whole micro-batches on every rank, or where `global` BatchNorm would
    need statistics across micro-batches of one rank."""
    st: StageConfig = getattr(cfg, stage)
    if st.global_batch % world:
        raise ConfigError(
            f"{stage}.global_batch={st.global_batch} is not divisible by the world size {world}: "
            f"set it to a multiple of {world}"
        )
    share = st.global_batch // world
    m = st.micro_batch or share
    if m > share or share % m:
        raise ConfigError(
            f"{stage}.micro_batch={m} does not split a rank's share of {share} clips "
            f"({stage}.global_batch={st.global_batch} / {world} ranks) into whole micro-batches: "
            f"use a divisor of {share}, or 0 for the whole share"
        )
    mode, group = batchnorm_mode(cfg.model.batchnorm)
    if mode == "group" and m % group:
        fix = (
            f"set {stage}.micro_batch to a multiple of {group} that divides {share}"
            if share % group == 0
            else f"use a world size whose share ({stage}.global_batch / world) is a multiple of {group}"
        )
        raise ConfigError(
            f"model.batchnorm='group {group}' needs whole groups in every micro-batch, but a rank's "
            f"{'share' if m == share else 'micro-batch'} in {stage} at {world} ranks is {m} clips: {fix}"
        )
    if m < share and mode == "global":
        raise ConfigError(
            f"{stage}.micro_batch={m} splits a rank's share of {share} clips, but model.batchnorm="
            f"'global' needs the global batch's statistics, which no rank can have across its own "
            f"micro-batches: use model.batchnorm='group N' (N dividing {m}) or 'frozen', or "
            f"{stage}.micro_batch=0 on more or larger GPUs"
        )
    return m


def eval_batch(cfg: "Config") -> int:
    """Clips per forward of every evaluation and embedding pass (decoding, retrieval, self mode's table, the
    reference export): eval.batch_size, capped at the smallest stageN.micro_batch set, so that none of them
    holds more clips at once than training does where memory made the user choose a micro-batch."""
    micros = [
        getattr(cfg, n).micro_batch
        for n in ("stage1", "stage2")
        if getattr(cfg, n).enabled and getattr(cfg, n).micro_batch
    ]
    return min([cfg.eval.batch_size, *micros])


def name_fields(cfg: "Config") -> dict[str, tuple[str, ...]]:
    """Every field whose value is a name: `section.key` -> the names it accepts, read from the registry
    of implementations (`sclslt.registry`) or from the field's `Literal` type. Nowhere else lists them."""
    out = {}
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        hints = _hints(type(section))
        for f in dataclasses.fields(section):
            key = f"{sec.name}.{f.name}"
            if key in REGISTRIES:
                out[key] = REGISTRIES[key].names()
            elif typing.get_origin(hints[f.name]) is Literal:
                out[key] = typing.get_args(hints[f.name])
    return out


# ---------------------------------------------------------------------------------------------
# building from dicts, files and the command line


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise naming the key."""
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(typ, value, key + ".")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
        if typ is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return out
    if origin is Literal:  # a closed set of names: the field's type holds them (and --help shows them)
        if str(value) not in typing.get_args(typ):
            raise ConfigError(f"{key}={value!r}: use one of {', '.join(map(repr, typing.get_args(typ)))}")
        return str(value)
    if typ is str:
        return str(value)
    if typ is list or origin is list:
        if isinstance(value, str):
            value = _yaml(value, key)
            value = [value] if isinstance(value, str) else value  # one name: a list of one
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    return value


# keys earlier versions wrote into run configs: read (a run's saved config.yaml must load) and dropped
RETIRED = {
    "data.shuffle_buffer": "training batches are global now (sclslt/data/loader.py): no per-rank shuffle buffer",
}


def _from_dict(cls, data: dict, prefix: str = ""):
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in [k for k in data if f"{prefix}{k}" in RETIRED]:
        print(f"sclslt: config key {prefix}{k} is retired and ignored: {RETIRED[prefix + k]}", file=sys.stderr)
        data = {kk: v for kk, v in data.items() if kk != k}
    for k in data:
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}' (known in this section: {sorted(names)})")
    obj = cls()
    for k, v in data.items():
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current) and isinstance(v, dict):
            # merge into the section's own defaults (stage defaults differ per stage)
            merged = dataclasses.asdict(current)
            _deep_update(merged, v)
            setattr(obj, k, _from_dict(type(current), merged, f"{prefix}{k}."))
        else:
            setattr(obj, k, _coerce(v, hints[k], prefix + k))
    return obj


def _deep_update(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    return _from_dict(Config, data).validate()


def parse_overrides(args: list[str]) -> dict:
    """`--a.b.c value` / `--a.b.c=value` pairs -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r}: overrides look like --section.key value")
        if "=" in a:
            key, raw = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {a} has no value")
            key, raw = a[2:], args[i + 1]
            i += 2
        if "." not in key:
            raise ConfigError(f"override --{key}: use the dotted form --section.key (e.g. --train.max_steps 50)")
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _yaml(raw, f"override --{key}") if raw != "" else ""
    return out


def _yaml(text: str, what: str):
    """YAML text -> value; malformed YAML is a ConfigError naming where it came from."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: not valid YAML ({str(e).splitlines()[0]})") from None


def _read_experiment(p: Path, seen: tuple = ()) -> dict:
    """An experiment file; `base: other.yaml` (relative to the file) is read first and overridden."""
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist" + (f" (base of {seen[-1]})" if seen else ""))
    if p.resolve() in seen:
        raise ConfigError(f"config file {p}: circular base chain {[str(x) for x in seen]}")
    try:
        body = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"config file {p}: cannot be read as UTF-8 text ({e})") from None
    loaded = _yaml(body, f"config file {p}") or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if not isinstance(base, str):
        raise ConfigError(f"config file {p}: base must be a file name, got {base!r}")
    return _deep_update(_read_experiment(p.parent / base, seen + (p.resolve(),)), loaded)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults <- experiment file <- dotted overrides; validated."""
    data: dict = _read_experiment(Path(path)) if path else {}
    if overrides:
        ov = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        data = _deep_update(data, ov)
    try:
        return from_dict(data)
    except ConfigError as e:
        if not path or str(path) in str(e):
            raise
        where = f"{path} (with the overrides given)" if overrides else str(path)
        raise ConfigError(f"{where}: {e}") from None


def field_help() -> list[str]:
    """One line per config field, `--section.key (default ...): comment` (what `sclslt train --help` and
    `launch/train.py --help` list)."""
    return [f"  --{key} (default {value!r})" + (f": {note}" if note else "") for key, value, note in field_rows()]


REFERENCE_MARK = "<!-- generated: sclslt.config field reference -->"


def field_reference() -> str:
    """docs/configuration.md's field reference: a table per section, from the same rows as `field_help`."""
    out, section = [], None
    for key, value, note in field_rows():
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            out += ["", f"### `{section}`", "", "| field | default | what |", "|---|---|---|"]
        out.append(f"| `{key}` | `{value!r}` | {note.replace('|', chr(92) + '|')} |")
    return "\n".join(out[1:]) + "\n"


def write_field_reference(doc="docs/configuration.md") -> None:
    """Rewrite the guide's field reference (everything after REFERENCE_MARK) from the config's comments."""
    path = Path(doc)
    text = path.read_text()
    write_text(path, text[: text.index(REFERENCE_MARK) + len(REFERENCE_MARK)] + "\n\n" + field_reference())


def field_rows() -> list[tuple[str, object, str]]:
    """(section.key, default, comment) of every config field, from the comments in this file; a name field's
    comment starts with the names it takes."""
    import inspect
    import re

    def comments(cls) -> dict:
        """field -> its comment, continuation lines (comment-only lines right under a field's line) joined on."""
        out, last = {}, None
        for line in inspect.getsource(cls).splitlines():
            field = re.match(r"^\s+(\w+):[^#]*?(?:#\s*(.*))?$", line)
            more = re.match(r"^\s+#\s*(.*)$", line)
            if more and last is not None:
                out[last] = f"{out[last]} {more.group(1)}".strip()
            elif field and not line.lstrip().startswith(("def ", "@", '"""')):
                last = field.group(1)
                out[last] = (field.group(2) or "").strip()
            else:
                last = None
        return out

    def walk(obj, prefix: str) -> list[tuple]:
        out, notes = [], comments(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out += walk(value, f"{prefix}{f.name}.")
            else:
                note = notes.get(f.name, "")
                names = choices.get(f"{prefix}{f.name}")
                if names:
                    note = f"one of {', '.join(names)}" + (f"; {note}" if note else "")
                out.append((f"{prefix}{f.name}", value, note))
        return out

    choices = name_fields(Config())
    return walk(Config(), "")


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
