"""The model card (README.md) of an export: the Hub's YAML metadata (language, license, tags, datasets, and a
`model-index` with test BLEU-4, ROUGE-L and chrF and their sacrebleu signatures, built with huggingface_hub's
`ModelCardData` / `EvalResult`) and the prose a reader needs: data and splits, the recipe and GPU count,
the selected checkpoint, the trivial baseline beside the scores, intended use, limitations, citation.
Every number comes from the run's results.json and config."""

from __future__ import annotations

from pathlib import Path

# shard_videos.py layouts -> (card dataset name, Hub dataset id or name, ISO 639-1 language, sign language)
CORPORA = {
    "phoenix2014t": ("RWTH-PHOENIX-Weather 2014 T", "PHOENIX-2014T", "de", "German Sign Language (DGS)"),
    "csl-daily": ("CSL-Daily", "CSL-Daily", "zh", "Chinese Sign Language (CSL)"),
    "how2sign": ("How2Sign", "How2Sign", "en", "American Sign Language (ASL)"),
    "synthetic": ("sclslt synthetic sign corpus", "synthetic", "en", "a synthetic sign language (test bed)"),
}

LANGUAGES = {"de": "German", "zh": "Chinese", "en": "English"}

CITATION = """@inproceedings{lai2026scl,
  title     = {Selective Contrastive Learning For Gloss Free Sign Language Translation},
  author    = {Lai and Su and Zhao and Zhong and Chen},
  booktitle = {Proceedings of the Annual Meeting of the Association for Computational Linguistics (ACL)},
  year      = {2026},
  note      = {arXiv:2604.22374}
}"""


def corpus_of(cfg) -> tuple[str, str, str, str, dict]:
    """(name, dataset id, language, sign language, clips per split) of the run's corpus."""
    from sclslt.data.corpus import resolve_shards_dir
    from sclslt.data.shards import read_manifest

    shards = resolve_shards_dir(cfg.data)
    counts, layout = {}, "synthetic" if cfg.data.corpus == "synthetic" else ""
    for split in ("train", "dev", "test"):
        try:
            m = read_manifest(shards, split)
        except (FileNotFoundError, OSError, ValueError):
            continue
        counts[split] = int(m.get("num_samples", len(m.get("samples", []))))
        layout = layout or str((m.get("options") or {}).get("layout", ""))
    name, ds, lang, sign = CORPORA.get(layout, (layout or "custom corpus", layout or "custom", "", "sign language"))
    if cfg.model.lang:
        lang = cfg.model.lang.split("_")[0]
    return name, ds, lang, sign, counts


def _metric(res: dict, key: str) -> float:
    return round(float(res[key]), 2)


def card_data(cfg, results: dict, config: dict, license: str, name: str):
    from huggingface_hub import EvalResult, ModelCardData

    corpus, ds, lang, _, _ = corpus_of(cfg)
    m = results["model"]
    split = results.get("split", "test")
    evals = [
        EvalResult(
            task_type="translation",
            task_name="Sign language translation",
            dataset_type=ds,
            dataset_name=corpus,
            dataset_split=split,
            metric_type=t,
            metric_name=n,
            metric_value=_metric(m, k),
            metric_args={"signature": m[sig]} if sig else None,
        )
        for t, n, k, sig in (
            ("bleu", "BLEU-4", "bleu4", "bleu_signature"),
            ("rouge", "ROUGE-L", "rouge_l", None),
            ("chrf", "chrF", "chrf", "chrf_signature"),
        )
    ]
    return ModelCardData(
        model_name=name,
        language=[lang] if lang else None,
        license=license,
        library_name="sclslt",
        tags=["sign-language-translation", "gloss-free", "video-to-text", "contrastive-learning", "sclslt"],
        datasets=[ds],
        eval_results=evals,
        metrics=["bleu", "rouge", "chrf"],
    )


def recipe(cfg, results: dict, config: dict) -> list[str]:
    s1, s2, sel = cfg.stage1, cfg.stage2, cfg.selection
    world = results.get("world")
    lines = [f"- GPUs (ranks): {world}; the global batch does not depend on it (the same run at any GPU count)."]
    if s1.enabled:
        batches = {
            "random": "random batches",
            "ps": f"Pair Selection batches ({sel.schedule} schedule, reference table `{Path(sel.table).name}`)",
            "self": "Pair Selection from the run's own embeddings",
        }[sel.mode]
        lines.append(
            f"- Stage 1 (video-text contrastive + translation): {s1.epochs} epochs, global batch "
            f"{s1.global_batch}, lr {s1.lr:g}, {batches}, similarity `{cfg.model.similarity}`, identical "
            f"sentences {'masked' if s1.mask_same_sentence else 'not masked'} in the InfoNCE"
            + (
                f", close texts ({s1.mask_close_text_kind} >= {s1.mask_close_text:g}) "
                f"{'as soft positives' if s1.soft_close_text else 'masked'}"
                if s1.mask_close_text
                else ""
            )
            + "."
        )
    if s2.enabled:
        lines.append(
            f"- Stage 2 (translation): {s2.epochs} epochs, global batch {s2.global_batch}, lr {s2.lr:g}, "
            f"label smoothing {s2.label_smoothing:g}."
        )
    mc = cfg.model
    parts = [
        f"backbone {'`' + mc.backbone + '`' if mc.backbone else 'ResNet trained from scratch'}",
        "mBART " + (f"`{mc.mbart}`" if mc.mbart else f"from scratch ({mc.layers}+{mc.layers} layers, d={mc.d_model})"),
        f"tokenizer {'`' + mc.tokenizer + '`' if mc.tokenizer else 'trained on the corpus'}",
    ]
    if config["lora"] != "none":
        parts.append(
            f"LoRA rank {mc.lora_rank} "
            + ("(merged into the weights)" if config["lora"] == "merged" else "(kept as adapters)")
        )
    lines.append("- Model: " + ", ".join(parts) + ".")
    lines.append(
        f"- Decoding: beam {config['generation']['beam']}, at most {config['generation']['max_len']} new tokens."
    )
    return lines


def model_card(run: Path, cfg, results: dict, config: dict, license: str, name: str) -> str:
    from huggingface_hub import ModelCard

    corpus, ds, lang, sign, counts = corpus_of(cfg)
    m, triv = results["model"], results.get("trivial_baseline", {})
    sel = results.get("selected_checkpoint") or {}
    row = lambda label, r: f"| {label} | {r['bleu4']:.2f} | {r['rouge_l']:.2f} | {r['chrf']:.2f} |"
    splits = ", ".join(f"{s} {n}" for s, n in counts.items())
    text = [
        f"# {name}",
        "",
        f"Gloss-free sign language translation from {sign} video to {LANGUAGES.get(lang, lang or 'spoken-language')} "
        f"text, trained with sclslt (Selective Contrastive Learning, SCL-SLT, ACL 2026).",
        "",
        "## Results",
        "",
        f"{results.get('split', 'test')} split, {m.get('n', counts.get('test', '?'))} clips:",
        "",
        "| | BLEU-4 | ROUGE-L | chrF |",
        "|---|---|---|---|",
        row("this model", m),
    ]
    if triv:
        text.append(row(f'trivial baseline (always "{triv.get("sentence", "")}")', triv))
    text += [
        "",
        f"BLEU: sacrebleu `{m['bleu_signature']}`; chrF: sacrebleu `{m['chrf_signature']}`; ROUGE-L: "
        "F-measure of the longest common subsequence (`rouge-score` conventions).",
        "",
        "## Data",
        "",
        f"{corpus} ({splits} clips; dev chose the checkpoint, test is reported above).",
        "",
        "## Training",
        "",
    ] + recipe(cfg, results, config)
    text += [
        "",
        "## Checkpoint",
        "",
        f"`{config['provenance']['checkpoint']}` of run `{run.name}`: {config['provenance']['checkpoint_choice']}"
        + (f" (rule: {sel['rule']})" if sel.get("rule") else "")
        + ".",
        "",
        *provenance_lines(results.get("provenance")),
        "## Use",
        "",
        "```python",
        "from sclslt import SignTranslator",
        'model = SignTranslator.from_pretrained("path/or/hub-name")',
        'print(model.translate("clip.mp4"))   # a video file or a folder of frames',
        "```",
        "",
        "or `sclslt translate --model path/or/hub-name clip.mp4`. Frames are decoded, resized to "
        f"{config['frames']['shape'][0]}x{config['frames']['shape'][1]} and subsampled as in training "
        f"(`config.json`, `frames`).",
        "",
        "## Intended use and limitations",
        "",
        f"Research on sign language translation. The model knows the signers, vocabulary and domain of {corpus} "
        "only: it is not a general sign language translator, and its output on other signers, camera set-ups or "
        "topics can be fluent and wrong. Do not use it where a wrong translation can harm someone (medical, legal "
        "or emergency settings) or in place of a human interpreter. Check the corpus's licence before any use: "
        f"this card's license field says `{license}`.",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    card = ModelCard(f"---\n{card_data(cfg, results, config, license, name).to_yaml()}\n---\n\n" + "\n".join(text))
    return str(card)


def provenance_lines(prov: dict | None) -> list[str]:
    """The card's account of every input (results.json's `provenance`, sclslt/eval/provenance.py)."""
    if not prov:
        return []
    out = [
        "## Provenance",
        "",
        "Shard manifests (sha256; each lists its shards' sha256): "
        + ", ".join(f"{sp} `{h[:16]}`" for sp, h in prov["shards"]["manifest_sha256"].items())
        + ".",
    ]
    pre = {**prov.get("pretrained", {}), **({"init_from": prov["init_from"]} if "init_from" in prov else {})}
    out.append(
        "Pretrained sources: "
        + (
            "; ".join(
                f"`{k}` {r['source']}"
                + (
                    f" (sha256 `{r['sha256'][:16]}`)"
                    if r.get("sha256")
                    else f" (revision {r['revision']})"
                    if r.get("revision")
                    else ""
                )
                for k, r in pre.items()
            )
            if pre
            else "none (every weight trained from scratch on this corpus)"
        )
        + "."
    )
    t = prov.get("selection_table")
    if t:
        out.append(
            f"Pair Selection reference table sha256 `{t['sha256'][:16]}`, exported from run `{t.get('run')}` "
            f"at checkpoints {t.get('early')} and {t.get('late')} ({t.get('score', 'pooled')} scoring)."
        )
    return out + [""]
