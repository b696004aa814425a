"""A stage's close sentence pairs (`sclslt.model.close_text`), the same on every rank and across a resume."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from sclslt.data.shards import manifest_rows, read_manifest
from sclslt.model import close_text
from sclslt.model.slt import SLTModel
from sclslt.runtime.context import Context
from sclslt.runtime.rundir import RunError


def stage_close_pairs(ctx: Context, name: str, model: SLTModel) -> close_text.CloseSentences | None:
    """The stage's close pairs (None when `mask_close_text` is 0): computed on rank 0 from the stage's
    starting text encoder and written into the run's selection directory, or read back from there
    (every rank; a resumed run), so all ranks use the same pairs."""
    st = getattr(ctx.cfg, name)
    if st.mask_close_text <= 0 or st.contrastive_weight == 0:
        return None
    path = Path(ctx.run.selection(name)) / close_text.CLOSE_FILE
    want = {"kind": st.mask_close_text_kind, "threshold": st.mask_close_text}
    if not path.is_file() and ctx.rank == 0:
        rows = manifest_rows(read_manifest(ctx.shards_dir, "train"))
        close = close_text.build(
            st.mask_close_text_kind, st.mask_close_text, rows, model, ctx.tokenizer, ctx.dist.device
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        close.save(path, want)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    have = close_text.CloseSentences.made_by(path)
    if have != want:
        raise RunError(
            f"{path} holds close pairs made with {have or 'unknown settings'}, but {name} asks for {want}: "
            f"resume with the run's own settings, or delete the file to find the pairs again"
        )
    close = close_text.CloseSentences.load(path, st.soft_close_text)
    ctx.reporter.info(
        f"{name}: {len(close.codes) // 2} close sentence pairs ({st.mask_close_text_kind} >= "
        f"{st.mask_close_text}) of {len(close.sids)} sentences, "
        + (f"soft positives (w={st.soft_close_text})" if st.soft_close_text else "masked")
    )
    return close
