"""Text normalisation, sentence ids and tokenizers.

`sentence_id` is the identity used to mask known false negatives (identical sentences) in the
contrastive loss and in Pair Selection: a 63-bit hash of the normalised text, stable across
processes, machines and Python versions (never Python's salted `hash`).

`make_run_tokenizer` makes the run's tokenizer directory (`<run_dir>/tokenizer/`), one of:
- trained on the training texts with the `tokenizers` library: BPE over a Metaspace pre-tokenizer
  (`tokenizer_kind: bpe`), or one token per character (`tokenizer_kind: char`, for Chinese); both
  decode back to the exact normalised text and append `</s>`;
- a pretrained tokenizer (e.g. mBART's, local directory or hub name), trimmed to the tokens the
  training texts use (`trim_vocab`, GFSLT-VLP; see `vocab.py`) or saved as is.
Every directory made here carries `sclslt_vocab.json` (see `vocab.py`): what it is, its vocabulary
hash, and for a trimmed one the kept original ids that `models.py` uses to remap a pretrained mBART.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import Path

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # mBART's order: bos=0, pad=1, eos=2, unk=3

_WS = re.compile(r"\s+")


def normalise_text(text: str, lowercase: bool = True) -> str:
    """NFKC, optional lowercase, single spaces, stripped. The original text is kept in metadata."""
    t = unicodedata.normalize("NFKC", text)
    if lowercase:
        t = t.lower()
    return _WS.sub(" ", t).strip()


def sentence_id(text: str, lowercase: bool = True) -> int:
    """Stable 63-bit id of the normalised sentence (fits torch.int64)."""
    digest = hashlib.sha1(normalise_text(text, lowercase).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def train_char_tokenizer(texts: list[str], out_dir: str | Path):
    """A character-level tokenizer: every character of the (normalised) text is one token, spaces too,
    so decoding is exact; ids are the special tokens then the characters in code-point order."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(texts)) - set(SPECIAL_TOKENS))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def train_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 8000):
    """Train a BPE tokenizer on `texts` and save it (transformers format) to `out_dir`."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(sorted(texts), trainer=trainer)  # sorted: order-independent result
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(name_or_path: str | Path, **kwargs):
    """Load a tokenizer saved with the run, a local directory, or a hub name (offline errors are clear).
    A directory made by `make_run_tokenizer` also holds its vocab record: `vocab.record_of(tokenizer)`."""
    from huggingface_hub.errors import HFValidationError
    from transformers import AutoTokenizer

    from sclslt.data.vocab import read_record

    if Path(name_or_path).is_dir():
        read_record(name_or_path)  # a damaged record fails here, at load, naming its file
    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
    except (OSError, HFValidationError) as e:
        raise FileNotFoundError(
            f"cannot load tokenizer {str(name_or_path)!r}: not a local directory with tokenizer files and not "
            f"reachable on the hub (offline?). Pass model.tokenizer=<local dir>. Cause: {e}"
        ) from e
    return tok


def _pretrained_tokenizer(model_cfg, name: str, lang: str, texts: list[str]):
    """(tokenizer, record) of a pretrained tokenizer: trimmed to `texts` (model.trim_vocab) or as is."""
    from sclslt.data import vocab as V

    orig = load_tokenizer(name)
    if lang:
        lang_id = orig.convert_tokens_to_ids(lang)
        if lang_id is None or lang_id == orig.unk_token_id:
            raise ValueError(f"model.lang={lang!r} is not a token of tokenizer {name!r}")
        orig = load_tokenizer(name, src_lang=lang, tgt_lang=lang)  # mBART puts it around every text
    else:  # an mBART tokenizer adds its default language code anyway: say so, and follow it
        prefix, suffix = V.special_layout(orig, texts[0] if texts else "a")
        codes = getattr(orig, "lang_code_to_id", None) or {}
        found = [c for c, i in codes.items() if i in prefix + suffix]
        if found:
            lang = found[0]
            print(
                f"sclslt: tokenizer: model.lang is not set; {name} adds its default language code {lang!r} "
                f"(set model.lang to the target language, e.g. de_DE or zh_CN)",
                flush=True,
            )
    if getattr(model_cfg, "trim_vocab", True):
        tok, record = V.trim_tokenizer(orig, texts, lang, source=str(name))
    else:
        tok = orig
        prefix, suffix = V.special_layout(orig, texts[0] if texts else "a")
        lang_id = orig.convert_tokens_to_ids(lang) if lang else None
        record = {
            "format": V.FORMAT,
            "kind": "pretrained",
            "source": str(name),
            "source_class": type(orig).__name__,
            "source_size": len(orig),
            "trimmed": False,
            "kept_ids": None,
            "sha256": None,
            "size": len(orig),
            "lang": lang or None,
            "lang_id": lang_id,
            "lang_style": V.lang_style(prefix, suffix, lang_id),
            "train_texts": len(texts),
            "train_texts_with_unk": V.unk_report(orig, texts)["texts_with_unk"],
        }
    return tok, record


def make_run_tokenizer(
    model_cfg, train_texts: list[str], out_dir: str | Path, heldout: dict[str, list[str]] | None = None
):
    """Create the run's tokenizer in `out_dir` (rank 0, once) and return it as `load_tokenizer` would.
    `out_dir` is replaced as a whole (built next to it, then renamed): it is complete or absent.

    - `model_cfg.tokenizer` empty: train BPE (`tokenizer_kind: bpe`) or char (`char`) on `train_texts`;
    - pretrained with `trim_vocab`: keep the tokens `train_texts` use (+ special tokens, + `lang`);
    - pretrained without: save it as is (with `lang` as its source/target language when set).
    `train_texts` are the normalised training targets (as `Collate` tokenizes them). `heldout`
    ({"dev": [...], "test": [...]}) only adds <unk> counts to the record. The record
    (`out_dir/sclslt_vocab.json`, `vocab.record_of(tok)`) holds `vocab_sha256` (every kind) and, when
    trimmed, `sha256` of the kept original ids: the numbers to put into results.
    """
    import os
    import shutil

    from sclslt.data import vocab as V

    final = Path(out_dir)
    out_dir = final.parent / f".{final.name}.tmp-{os.getpid()}"  # complete or absent: renamed at the end
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    texts = list(train_texts)
    name, lang = model_cfg.tokenizer, getattr(model_cfg, "lang", "") or ""
    if not name:
        kind = getattr(model_cfg, "tokenizer_kind", "bpe")
        if kind == "char":
            tok = train_char_tokenizer(texts, out_dir)
        elif kind == "bpe":
            tok = train_tokenizer(texts, out_dir)
        else:
            raise ValueError(f"model.tokenizer_kind={kind!r}: use 'bpe' or 'char'")
        record = {
            "format": V.FORMAT,
            "kind": kind,
            "source": "",
            "trimmed": False,
            "kept_ids": None,
            "sha256": None,
            "lang": None,
            "lang_id": None,
            "lang_style": None,
            "size": len(tok),
        }
        if lang:
            print(
                f"sclslt: tokenizer: model.lang={lang!r} ignored: it applies to a pretrained tokenizer only", flush=True
            )
    else:
        tok, record = _pretrained_tokenizer(model_cfg, name, lang, texts)
        tok.save_pretrained(str(out_dir))
    record["vocab_sha256"] = V.vocab_sha256(tok)
    record["heldout_unk"] = {k: V.unk_report(tok, list(v)) for k, v in (heldout or {}).items()}
    V.write_record(out_dir, record)
    if final.exists():
        shutil.rmtree(final)
    os.replace(out_dir, final)
    tok = load_tokenizer(final)
    what = (
        f"trimmed {record['source']} from {record['source_size']} to {record['size']} tokens "
        f"(kept-ids sha256 {record['sha256'][:16]})"
        if record["trimmed"]
        else f"{record['kind']} {record['source'] or 'trained on the corpus'}, {record['size']} tokens"
    )
    unk = ", ".join(
        f"{k}: {v['unk_tokens']} <unk> in {v['texts_with_unk']}/{v['texts']} texts"
        for k, v in record["heldout_unk"].items()
    )
    print(
        f"sclslt: tokenizer: {what}, vocab sha256 {record['vocab_sha256'][:16]}" + (f"; {unk}" if unk else ""),
        flush=True,
    )
    if record.get("train_texts_with_unk"):
        print(
            f"sclslt: tokenizer: warning: {record['train_texts_with_unk']} training texts contain tokens the "
            f"pretrained tokenizer itself maps to <unk>",
            flush=True,
        )
    return tok
