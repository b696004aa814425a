"""The reference table's files, each format's writer beside its reader (safetensors throughout):

- single file   `save_table` / `load_table`: both embedding passes of every clip (`sclslt reference --out
                FILE`), and the dense delta matrix of a CiCo-scored table
- sharded       a directory of single files, one per exporting rank, listed in `TABLE_INDEX`
                (`sclslt reference --out DIR`; written by sclslt/selection/reference.py, read by `load_table`)
- snapshots     `save_snapshot` / `load_snapshot`: one embedding pass; two of them make a table
                (`table_from_snapshots`: the self mode, experiments/pair_selection/trajectories.py)

`table_info` reads a table's size without its tensors. The table in memory and its scoring: `scoring`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sclslt.atomic import atomic_path
from sclslt.selection.scoring import Table, key_positions, key_rows

TABLE_INDEX = "index.json"

# --- single file -------------------------------------------------------------------------------------


def save_table(path, early: dict, late: dict, meta: dict, delta: torch.Tensor | None = None) -> None:
    """A reference table: two embedding passes (same samples) in one safetensors file, and the dense
    delta matrix where the scoring similarity does not factorise (`Table.delta`)."""
    from safetensors.torch import save_file

    if early["keys"] != late["keys"]:
        raise ValueError("the early and late embedding passes cover different samples")
    tensors = {
        "sentence_ids": early["sentence_ids"].long().contiguous(),
        "v0": early["video"].float().contiguous(),
        "t0": early["text"].float().contiguous(),
        "v1": late["video"].float().contiguous(),
        "t1": late["text"].float().contiguous(),
    }
    if delta is not None:
        tensors["delta"] = delta.float().contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"keys": json.dumps(early["keys"]), "meta": json.dumps(meta)})


def load_table(path, device="cpu", keys: list[str] | None = None, dtype: torch.dtype = torch.float64) -> Table:
    """A reference table (a file, or a sharded directory); with `keys`, only those rows (a rank's pool:
    the file is read in contiguous slices, never whole), stored in `dtype` (see `Table`: float16 for
    corpora of millions of clips)."""
    from safetensors import safe_open

    if Path(path).is_dir():
        return _load_sharded(path, device, keys, dtype)
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
        all_keys = json.loads(md["keys"])
        if keys is None:
            t = {k: f.get_tensor(k) for k in f.keys()}
            return Table(
                keys=all_keys,
                sentence_ids=t["sentence_ids"],
                v0=t["v0"],
                t0=t["t0"],
                v1=t["v1"],
                t1=t["t1"],
                device=device,
                delta=t.get("delta"),
                dtype=dtype,
            )
        if "delta" in f.keys():
            raise ValueError(f"{path}: a dense (CiCo-scored) table is whole on every rank; load it without keys")
        want = key_positions(key_rows(all_keys), keys, path)
        order = torch.sort(want)
        idx = order.values
        runs = torch.nonzero(idx[1:] != idx[:-1] + 1).flatten() + 1  # starts of contiguous runs
        bounds = list(zip([0] + runs.tolist(), runs.tolist() + [len(idx)]))
        t = {}
        for name in ("sentence_ids", "v0", "t0", "v1", "t1"):
            sl = f.get_slice(name)
            parts = [sl[int(idx[a]) : int(idx[b - 1]) + 1] for a, b in bounds]
            x = torch.cat(parts) if parts else sl[0:0]
            x = x if name == "sentence_ids" else x.to(dtype)
            t[name] = torch.empty_like(x).index_copy_(0, order.indices, x)  # back to the order of `keys`
    return Table(
        keys=list(keys),
        sentence_ids=t["sentence_ids"],
        v0=t["v0"],
        t0=t["t0"],
        v1=t["v1"],
        t1=t["t1"],
        device=device,
        dtype=dtype,
    )


def table_info(path) -> tuple[int, bool]:
    """(samples, whether the table is dense: CiCo-scored) of a table file or sharded table directory,
    without reading its tensors."""
    from safetensors import safe_open

    if Path(path).is_dir():
        return sum(p["rows"] for p in _table_index(path)["parts"]), False
    with safe_open(str(path), framework="pt") as f:
        return len(json.loads(f.metadata()["keys"])), "delta" in f.keys()


# --- sharded: a directory of single files and their index --------------------------------------------


def _table_index(path) -> dict:
    f = Path(path) / TABLE_INDEX
    if not f.is_file():
        raise FileNotFoundError(
            f"{path}: a sharded reference table needs {TABLE_INDEX} (an export that did not "
            f"finish? run sclslt reference again with --resume)"
        )
    return json.loads(f.read_text())


def _load_sharded(path, device, keys, dtype) -> Table:
    """A table written as one part per exporting rank (sclslt reference --out DIR)."""
    from safetensors import safe_open

    parts = _table_index(path)["parts"]
    if keys is None:
        tabs = [load_table(Path(path) / p["name"], "cpu", None, dtype) for p in parts]
    else:
        want, tabs = set(keys), []
        for p in parts:
            with safe_open(str(Path(path) / p["name"]), framework="pt") as f:
                mine = [k for k in json.loads(f.metadata()["keys"]) if k in want]
            if mine:
                tabs.append(load_table(Path(path) / p["name"], "cpu", mine, dtype))
    all_keys = [k for tb in tabs for k in tb.keys]
    r = None if keys is None else key_positions(key_rows(all_keys), keys, path)  # back to the order asked for
    cols = {v: torch.cat([getattr(tb, v) for tb in tabs]) for v in ("sentence_ids", "v0", "t0", "v1", "t1")}
    if r is not None:
        cols, all_keys = {v: x[r] for v, x in cols.items()}, list(keys)
    return Table(keys=all_keys, **cols, device=device, dtype=dtype)


# --- snapshots: one embedding pass a file --------------------------------------------------------------


def save_snapshot(path, emb: dict) -> None:
    """One embedding pass (keys, sentence ids, pooled video/text) as safetensors."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(
            {
                "sentence_ids": emb["sentence_ids"].long().contiguous(),
                "video": emb["video"].float().contiguous(),
                "text": emb["text"].float().contiguous(),
            },
            str(tmp),
            metadata={"keys": json.dumps(emb["keys"])},
        )


def load_snapshot(path) -> dict:
    """An embedding pass written by `save_snapshot`: its tensors, and its keys."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        out = {k: f.get_tensor(k) for k in f.keys()}
        out["keys"] = json.loads(f.metadata()["keys"])
    return out


def table_from_snapshots(early: dict, late: dict, device="cpu") -> Table:
    """The table of two embedding passes (`load_snapshot`'s) of the same samples."""
    if early["keys"] != late["keys"]:
        raise ValueError("the early and late embedding passes cover different samples")
    return Table(
        keys=list(early["keys"]),
        sentence_ids=early["sentence_ids"],
        v0=early["video"],
        t0=early["text"],
        v1=late["video"],
        t1=late["text"],
        device=device,
    )
