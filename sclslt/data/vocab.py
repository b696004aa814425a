"""Vocabulary trimming of a pretrained (mBART-style) tokenizer, GFSLT-VLP style, and the run's vocab record.

A pretrained mBART has ~250k tokens; a sign corpus uses a few thousand. `trim_tokenizer` keeps the
tokens the training texts use (every id the original tokenizer produces for them, specials added by
its post-processor included), plus all special tokens and the target language code, in increasing
original-id order, and rebuilds the `tokenizers` model with only those pieces, so that the trimmed
tokenizer is an ordinary `PreTrainedTokenizerFast` (loads with `AutoTokenizer`, pickles into loader
workers, no custom class). The model side (`models.build_mbart`) selects the same rows of the
embeddings and the LM head.

Exactness (checked on every build, an error otherwise): every training text encodes to the original
ids mapped to the new ones, and decodes to the same string. For a Unigram (sentencepiece) model this
holds by construction: the original best segmentation uses kept pieces only, and restricting the
vocabulary only removes other paths. The one path a smaller vocabulary can add is an `<unk>` node (for
a character whose single-character piece was dropped); its score is `min_score - 10` in `tokenizers`,
so the lowest special piece's score (a special token is matched as an added token, never by the model)
is lowered to make any `<unk>` path worse than any path of real pieces. Held-out texts may contain
pieces no training text used: they are re-segmented into kept pieces where possible, `<unk>` otherwise
(`unk_report` counts them).

The record (`sclslt_vocab.json`, next to the tokenizer files) holds the source, the kept original ids,
their sha256 (of the compact JSON list, e.g. "[0,1,2,5]"), the target-language convention and the
counts; `models.py` reads it to remap a pretrained mBART.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sclslt.atomic import write_text

VOCAB_FILE = "sclslt_vocab.json"
FORMAT = "sclslt-vocab-1"
_BATCH = 1024


def ids_sha256(ids: list[int]) -> str:
    """sha256 of the compact JSON list of ids ("[0,1,2]"): the identity of a trimmed vocabulary."""
    return hashlib.sha256(json.dumps([int(i) for i in ids], separators=(",", ":")).encode()).hexdigest()


def vocab_sha256(tok) -> str:
    """sha256 of the tokenizer's token strings in id order (the identity of any vocabulary)."""
    toks = tok.convert_ids_to_tokens(list(range(len(tok))))
    return hashlib.sha256(json.dumps(toks, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def encode_all(tok, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), _BATCH):
        out += tok(list(texts[i : i + _BATCH]), add_special_tokens=add_special_tokens)["input_ids"]
    return out


def special_layout(tok, probe: str) -> tuple[list[int], list[int]]:
    """(prefix ids, suffix ids) the tokenizer's post-processor puts around a single text."""
    full = tok(probe)["input_ids"]
    bare = tok(probe, add_special_tokens=False)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare) :]
    raise ValueError(f"cannot locate the text inside its encoding with special tokens ({full} vs {bare})")


def lang_style(prefix: list[int], suffix: list[int], lang_id: int | None) -> str | None:
    """'prefix' (mBART-50: [lang] X </s>), 'suffix' (mBART-cc25: X </s> [lang]) or None."""
    if lang_id is None:
        return None
    if lang_id in prefix:
        return "prefix"
    if lang_id in suffix:
        return "suffix"
    return None


def unk_report(tok, texts: list[str]) -> dict:
    """How many texts / tokens become <unk> (held-out texts under a trimmed or trained vocabulary)."""
    unk = tok.unk_token_id
    n_texts = n_tok = n_unk = 0
    for ids in encode_all(tok, texts, add_special_tokens=False):
        k = sum(1 for i in ids if i == unk)
        n_texts += k > 0
        n_unk += k
        n_tok += len(ids)
    return {"texts": len(texts), "texts_with_unk": n_texts, "tokens": n_tok, "unk_tokens": n_unk}


def _backend_spec(tok) -> dict:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:  # a slow (sentencepiece) tokenizer: convert it as transformers does
        from transformers.convert_slow_tokenizer import convert_slow_tokenizer

        backend = convert_slow_tokenizer(tok)
    return json.loads(backend.to_str())


def trim_tokenizer(orig, train_texts: list[str], lang: str = "", source: str = "", unk_guard: bool = True):
    """(trimmed PreTrainedTokenizerFast, record dict). `orig` must already use `lang` (src_lang) if set.
    `unk_guard=False` (tests only) leaves the <unk> score as `tokenizers` derives it."""
    if not train_texts:
        raise ValueError("trim_vocab: no training texts to trim the vocabulary with")
    spec = _backend_spec(orig)
    mtype = spec["model"].get("type")
    if mtype != "Unigram":
        raise ValueError(
            f"trim_vocab: tokenizer {source!r} has a {mtype} model; only Unigram (sentencepiece, "
            f"e.g. mBART's) tokenizers can be trimmed. Set model.trim_vocab=false"
        )
    lang_id = None
    if lang:
        lang_id = orig.convert_tokens_to_ids(lang)
        if lang_id is None or lang_id == orig.unk_token_id:
            raise ValueError(f"model.lang={lang!r} is not a token of tokenizer {source!r}")
    enc = encode_all(orig, train_texts)
    used = set()
    for ids in enc:
        used.update(ids)
    keep = sorted(used | set(orig.all_special_ids) | ({lang_id} if lang_id is not None else set()))
    if keep[-1] >= len(orig):
        raise ValueError(f"tokenizer {source!r} produced id {keep[-1]} >= its size {len(orig)}")
    new_of = {old: new for new, old in enumerate(keep)}
    backend = _trimmed_backend(spec, orig, keep, new_of, train_texts, unk_guard, source)
    prefix, suffix = _add_post_processor(backend, orig, train_texts[0], new_of)
    new = _fast_tokenizer(orig, backend, keep, new_of)
    _check_exact(orig, new, train_texts, enc, new_of)
    record = {
        "format": FORMAT,
        "kind": "pretrained",
        "source": source,
        "source_class": type(orig).__name__,
        "source_size": len(orig),
        "trimmed": True,
        "size": len(keep),
        "kept_ids": keep,
        "sha256": ids_sha256(keep),
        "lang": lang or None,
        "lang_id": new_of[lang_id] if lang_id is not None else None,
        "lang_style": lang_style(prefix, suffix, lang_id),
        "train_texts": len(train_texts),
        "train_texts_with_unk": sum(1 for ids in enc if orig.unk_token_id in ids),
    }
    return new, record


def _trimmed_backend(
    spec: dict, orig, keep: list[int], new_of: dict, train_texts: list[str], unk_guard: bool, source: str
):
    """The `tokenizers` backend of the kept pieces, in original id order (added-only ids, >= the model's
    size, come last), with the <unk> path priced out of every segmentation (module docstring)."""
    from tokenizers import Tokenizer

    vocab = spec["model"]["vocab"]
    n_model = len(vocab)
    pieces = [list(vocab[i]) for i in keep if i < n_model]
    special_ids = set(orig.all_special_ids)
    specials_in_model = [new_of[i] for i in keep if i < n_model and i in special_ids]
    if specials_in_model and unk_guard:
        scores = [float(p[1]) for p in pieces]
        longest = max(len(t) for t in train_texts) + 16  # at most this many pieces in a path
        pieces[specials_in_model[0]][1] = (min(min(scores), 0.0) - max(max(scores), 0.0)) * longest - 1e4
    spec["model"]["vocab"] = pieces
    if spec["model"].get("unk_id") is not None:
        old_unk = spec["model"]["unk_id"]
        if old_unk not in new_of:
            raise ValueError(f"tokenizer {source!r}: its model's unk id {old_unk} is not a special token")
        spec["model"]["unk_id"] = new_of[old_unk]
    spec["added_tokens"] = [{**a, "id": new_of[a["id"]]} for a in spec.get("added_tokens") or [] if a["id"] in new_of]
    spec["truncation"] = spec["padding"] = spec["post_processor"] = None
    return Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))


def _add_post_processor(backend, orig, sample_text: str, new_of: dict) -> tuple[list[int], list[int]]:
    """The same specials around the text as the original puts there; returns their (prefix, suffix) ids."""
    from tokenizers import processors

    prefix, suffix = special_layout(orig, sample_text)
    names = orig.convert_ids_to_tokens(prefix + suffix)
    p_names, s_names = names[: len(prefix)], names[len(prefix) :]
    if prefix or suffix:
        backend.post_processor = processors.TemplateProcessing(
            single=p_names + ["$A"] + s_names,
            pair=p_names + ["$A", "$B"] + s_names,
            special_tokens=sorted({(n, new_of[i]) for n, i in zip(names, prefix + suffix)}),
        )
    return prefix, suffix


def _fast_tokenizer(orig, backend, keep: list[int], new_of: dict):
    """A PreTrainedTokenizerFast around the trimmed backend with the original's named specials."""
    from transformers import PreTrainedTokenizerFast

    special_ids = set(orig.all_special_ids)
    named = {
        k: getattr(orig, k)
        for k in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
    }
    if named["bos_token"] is None:  # mBART-50's tokenizer names no bos; its config's bos is <s> = cls
        named["bos_token"] = named["cls_token"]
    named = {k: str(v) for k, v in named.items() if v is not None and orig.convert_tokens_to_ids(str(v)) in new_of}
    named_set = set(named.values())
    extra = [t for t in orig.convert_ids_to_tokens([i for i in keep if i in special_ids]) if t not in named_set]
    new = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **named,
        additional_special_tokens=extra,
        clean_up_tokenization_spaces=bool(getattr(orig, "clean_up_tokenization_spaces", False)),
        model_max_length=orig.model_max_length,
    )
    if len(new) != len(keep):
        raise RuntimeError(f"trimmed tokenizer has {len(new)} tokens, expected {len(keep)}")
    for i in keep:  # every kept token keeps its string
        if new.convert_ids_to_tokens(new_of[i]) != orig.convert_ids_to_tokens(i):
            raise RuntimeError(f"trimmed tokenizer: id {i} ({orig.convert_ids_to_tokens(i)!r}) moved")
    return new


def _check_exact(orig, new, train_texts: list[str], enc: list[list[int]], new_of: dict) -> None:
    """Exactness on the training texts (module docstring): the same ids, the same decoded strings."""
    got = encode_all(new, train_texts)
    for text, a, b in zip(train_texts, enc, got):
        if [new_of[i] for i in a] != b:
            raise RuntimeError(
                f"trimmed tokenizer encodes {text!r} as {b}, the original as {a} "
                f"(= {[new_of[i] for i in a]} after trimming)"
            )
    d_orig = orig.batch_decode(enc, skip_special_tokens=True)
    d_new = new.batch_decode(got, skip_special_tokens=True)
    bad = [t for t, x, y in zip(train_texts, d_orig, d_new) if x != y]
    if bad:
        raise RuntimeError(f"trimmed tokenizer decodes {len(bad)} training texts differently, e.g. {bad[0]!r}")


def write_record(out_dir, record: dict) -> None:
    write_text(Path(out_dir) / VOCAB_FILE, json.dumps(record, ensure_ascii=False, indent=1))


def read_record(path_or_dir) -> dict | None:
    """The record saved with a tokenizer directory, or None (no record: not made by sclslt)."""
    p = Path(path_or_dir)
    if p.is_dir():
        p = p / VOCAB_FILE
    if not p.is_file():
        return None
    rec = json.loads(p.read_text())
    if rec.get("format") != FORMAT:
        raise ValueError(f"{p}: unknown vocab record format {rec.get('format')!r} (expected {FORMAT})")
    if rec.get("kept_ids") is not None and ids_sha256(rec["kept_ids"]) != rec.get("sha256"):
        raise ValueError(f"{p}: kept_ids do not match their sha256 (file edited or corrupt)")
    return rec


def record_of(tokenizer) -> dict | None:
    """The vocab record saved with the directory a tokenizer was loaded from (`text.load_tokenizer`),
    or None (a hub name, or a directory sclslt did not make)."""
    name = getattr(tokenizer, "name_or_path", "") or ""
    return read_record(name) if name and Path(name).is_dir() else None
