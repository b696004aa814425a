"""Checkpoint files: what a published checkpoint holds and how it is read without running code.

Checkpoints are DeepSpeed's (ZeRO shards + module) plus our client state, a small `sclslt.json`
(step, epoch, data position, world size) and each rank's RNG states. They are written under
`<tag>.partial` and published by a rename plus an atomic `latest` update (`publish`), so a crash while
saving leaves the previous checkpoint loadable. Loading goes through torch's weights-only unpickler
with DeepSpeed's few state classes allowed (`safe_load`). A checkpoint written at another world size
is converted once to DeepSpeed's universal format (`to_universal`). `load_module_state` gives the fp32
module weights of any ZeRO stage. Every file's size and sha256 are recorded at save time
(`checksums.json`); a resume loads the newest checkpoint whose files still match (`intact_tag`),
naming each damaged one it passes over. When to save, what to call it and what to keep: `checkpointer`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from sclslt.atomic import write_text


def rng_state() -> dict:
    """This process's RNG states as tensors and ints only (loadable with weights_only=True)."""
    py = random.getstate()
    np_st = np.random.get_state()
    st = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_st[0], torch.from_numpy(np_st[1].astype(np.int64)), *np_st[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()  # this rank's own device, however GPUs are bound
    return st


def set_rng_state(st: dict) -> None:
    version, internal, gauss = st["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available() and torch.is_tensor(st["cuda"]):
        torch.cuda.set_rng_state(st["cuda"])


def _safe_globals() -> list:
    """The DeepSpeed classes its checkpoints hold, allowed through torch's weights-only unpickler;
    anything else in a checkpoint is refused rather than executed."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def safe_load(path: str | os.PathLike, map_location="cpu"):
    """torch.load with weights_only=True (plus DeepSpeed's own state classes): no arbitrary code."""
    import pickle

    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            import re

            # torch names the global as "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y whose module
            # x is blocked" (a function of a blocked module: os.system)
            what = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(e))
            raise RuntimeError(
                f"{path}: refused to unpickle it: it holds {what.group(1) if what else 'an object'}, "
                f"outside the allow-list in sclslt/runtime/checkpoints.py (_safe_globals); add the class there "
                f"only if you trust the file"
            ) from e


def publish(ckpt_dir: Path, tag: str) -> None:
    """`<tag>.partial` -> `<tag>`, then `latest` (written to a temporary file and renamed)."""
    final, partial = ckpt_dir / tag, ckpt_dir / f"{tag}.partial"
    if final.exists():  # the same tag again (a resumed run re-saving it)
        stale = ckpt_dir / f"{tag}.stale"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(partial, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(partial, final)
    write_text(ckpt_dir / "latest", tag)


def latest_tag(ckpt_dir: str | os.PathLike) -> str | None:
    f = Path(ckpt_dir) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    final, stale = Path(ckpt_dir) / tag, Path(ckpt_dir) / f"{tag}.stale"
    if not final.is_dir() and stale.is_dir():  # a crash while re-publishing the same tag: the old one
        try:
            os.replace(stale, final)
        except FileNotFoundError:  # another rank recovered it first
            pass
    return tag


def checkpoint_meta(ckpt_dir: str | os.PathLike, tag: str | None = None) -> dict | None:
    """The small JSON record of a published checkpoint (step, epoch, data position, world, ZeRO stage);
    an unreadable record is an error naming the file (`intact_tag` passes over such a checkpoint)."""
    tag = tag or latest_tag(ckpt_dir)
    f = Path(ckpt_dir) / str(tag) / "sclslt.json"
    if not (tag and f.is_file()):
        return None
    try:
        return json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RuntimeError(f"{f}: unreadable checkpoint record ({e}): a damaged checkpoint") from None


def to_universal(ckpt_dir: str | os.PathLike, tag: str) -> Path:
    """Convert checkpoint `tag` to DeepSpeed's universal format (once; under `<ckpt_dir>/universal/<tag>`),
    from which a job of any world size can resume. Run on one rank; the others wait at a barrier."""
    import subprocess
    import sys

    out = Path(ckpt_dir) / "universal" / tag
    if (out / "zero").is_dir():  # conversions are renamed into place only when complete
        return out
    tmp = out.with_name(tag + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(Path(ckpt_dir) / tag),
            "--output_folder",
            str(tmp),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
            "--inject_missing_state",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"converting {Path(ckpt_dir) / tag} to a universal checkpoint failed:\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


MODEL_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO-1/2, ZeRO-3


def load_module_state(ckpt_dir: str | os.PathLike, tag: str | None = None) -> dict:
    """The full fp32 module state dict of a checkpoint (any ZeRO stage), for stage transfer/inference."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint under {ckpt_dir} (no 'latest' file)")
    d = Path(ckpt_dir) / tag
    files = [d / f for f in MODEL_FILES]
    model_file = next((f for f in files if f.is_file()), None)
    if model_file is None:
        raise FileNotFoundError(f"checkpoint {d} has no model states file (looked for {[f.name for f in files]})")
    record = d / CHECKSUMS
    if record.is_file():  # the weights as they were written, or a clear error
        want = json.loads(record.read_text()).get(model_file.name)
        if want is not None and (model_file.stat().st_size != want[0] or _sha256(model_file) != want[1]):
            raise RuntimeError(
                f"{model_file} changed since it was written (size or sha256 differs from "
                f"{record.name}): a damaged checkpoint; use another tag"
            )
    states = safe_load(model_file)
    zero_stage = int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    half = any(v.is_floating_point() and v.dtype != torch.float32 for v in states["module"].values())
    if zero_stage == 3 or (half and zero_stage > 0):
        # ZeRO-3: parameters live partitioned in the optimizer states; bf16/fp16 training: the module file
        # holds rounded weights and the fp32 masters are in the optimizer states. Consolidate those.
        return {k: v.detach() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag).items()}
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}


# ---------------------------------------------------------------------------------------------
# checksums: every file of a checkpoint, recorded at save time and verified before a resume

CHECKSUMS = "checksums.json"


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _gather(x, world: int) -> list:
    if world == 1:
        return [x]
    out = [None] * world
    torch.distributed.all_gather_object(out, x)
    return out


def write_checksums(d: Path, rank: int, world: int) -> None:
    """Collective: every rank hashes its share of the files under checkpoint directory `d` (after all
    were written); rank 0 records {file: [size, sha256]} in `d/checksums.json`."""
    names = _files(d)
    mine = {n: [(d / n).stat().st_size, _sha256(d / n)] for n in names[rank::world]}
    parts = _gather(mine, world)
    if rank == 0:
        (d / CHECKSUMS).write_text(json.dumps({k: v for p in parts for k, v in p.items()}, indent=0))


def damaged(ckpt_dir: str | os.PathLike, tag: str, rank: int = 0, world: int = 1) -> list[str] | None:
    """Collective: what is wrong with checkpoint `tag` against its recorded checksums (a missing, resized
    or changed file, an unreadable record), [] if nothing; None for a checkpoint written before
    checksums existed (nothing to verify)."""
    d = Path(ckpt_dir) / tag
    problems = []
    try:
        meta = json.loads((d / "sclslt.json").read_text())
    except (OSError, ValueError) as e:
        meta, problems = {}, [f"sclslt.json unreadable ({type(e).__name__})"]
    record = None
    try:
        record = json.loads((d / CHECKSUMS).read_text())
    except FileNotFoundError:
        if not meta.get("checksummed"):
            return None if not problems else problems
        problems.append(f"{CHECKSUMS} missing")
    except (OSError, ValueError) as e:
        problems.append(f"{CHECKSUMS} unreadable ({type(e).__name__})")
    mine = []
    if record is not None:
        names = sorted(record)
        for n in names[rank::world]:
            size, sha = record[n]
            f = d / n
            if not f.is_file():
                mine.append(f"{n} missing")
            elif f.stat().st_size != size:
                mine.append(f"{n} has {f.stat().st_size} bytes, {size} were written")
            elif _sha256(f) != sha:
                mine.append(f"{n} changed since it was written (sha256)")
    return problems + [p for part in _gather(mine, world) for p in part]


def intact_tag(ckpt_dir: str | os.PathLike, rank: int = 0, world: int = 1) -> str | None:
    """Collective: the checkpoint a resume loads: `latest` if its files match their checksums, else the
    newest earlier one that does (each damaged one is named on rank 0's stderr); None without any."""
    import sys

    ckpt_dir = Path(ckpt_dir)
    latest = latest_tag(ckpt_dir)
    if latest is None:
        return None

    def step(t: str) -> int:
        try:
            return int((checkpoint_meta(ckpt_dir, t) or {}).get("step", -1))
        except (OSError, ValueError, AttributeError, RuntimeError):
            return -1

    others = [
        p.name
        for p in ckpt_dir.iterdir()
        if p.is_dir()
        and (p / "sclslt.json").exists()
        and p.name != latest
        and not p.name.endswith((".partial", ".stale"))
        and p.name != "universal"
    ]
    for tag in [latest] + sorted(others, key=lambda t: (step(t), t), reverse=True):
        problems = damaged(ckpt_dir, tag, rank, world)
        if not problems:
            if tag != latest:  # `latest` points at it from now on: nothing reads the damaged one
                if rank == 0:
                    print(
                        f"sclslt: resuming from {ckpt_dir}/{tag}, the newest intact checkpoint before the "
                        f"damaged latest ({latest})",
                        file=sys.stderr,
                        flush=True,
                    )
                    write_text(ckpt_dir / "latest", tag)
                if world > 1:
                    torch.distributed.barrier()
            return tag
        if rank == 0:
            print(
                f"sclslt: checkpoint {ckpt_dir}/{tag} is damaged: {'; '.join(problems[:4])}"
                + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""),
                file=sys.stderr,
                flush=True,
            )
    raise RuntimeError(
        f"no intact checkpoint under {ckpt_dir}: every one fails its checksums (named above); "
        f"move that directory away to train the stage again from its start"
    )
