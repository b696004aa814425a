"""Text normalisation, sentence ids and tokenizers.

`sentence_id` is the identity used to mask known false negatives (identical sentences) in the
contrastive loss and in Pair Selection: a 63-bit hash of the normalised text, stable across
processes, machines and Python versions (never Python's salted `hash`).

The default tokenizer is trained on the training texts with the `tokenizers` library (BPE over a
Metaspace pre-tokenizer, so it decodes back to the exact normalised text) and saved with the run;
a pretrained tokenizer (e.g. mBART's) loads from a local directory or hub name.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import Path

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]   # mBART's order: bos=0, pad=1, eos=2, unk=3

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


def train_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 8000):
    """Train a BPE tokenizer on `texts` and save it (transformers format) to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(sorted(texts), trainer=trainer)   # sorted: order-independent result
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(name_or_path: str | Path):
    """Load a tokenizer saved with the run, a local directory, or a hub name (offline errors are clear)."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load tokenizer {name_or_path!r}: not a local directory with tokenizer files and not "
            f"reachable on the hub (offline?). Pass model.tokenizer=<local dir>. Cause: {e}") from e
