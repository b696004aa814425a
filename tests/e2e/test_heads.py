"""The similarity-head seam (`SIMILARITY_HEADS`): a head defined and registered in this file alone trains,
evaluates and exports a Pair Selection table, with no change to the product.

`MaxPoolHead` scores max-pooled projected features by their dot product. A subprocess imports this
file (which registers the head), trains stage 1 with `--model.similarity maxpool` through the real
trainer, and exports a `--score maxpool` reference table through the real tool; this process checks
the table's delta against the head's own score matrix of the run's early and late checkpoints, the
retrieval of its evaluation embedding, and that without the registration the name is a clear config
error.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import torch.nn.functional as F
import yaml

from sclslt.model.heads import SimilarityHead
from sclslt.registry import SIMILARITY_HEADS
from sclslt_kernels import masked_ce
from tests.helpers import ROOT, TRAIN_ENV


class MaxPoolHead(SimilarityHead):
    name = "maxpool"
    columns = ("video_max", "text_max")

    def features(self, model, enc, mask, text, text_mask):
        neg = torch.finfo(enc.dtype).min
        v = model.video_proj(enc).masked_fill(~mask[..., None], neg).amax(1)
        t = model.text_proj(text).masked_fill(~text_mask.bool()[..., None], neg).amax(1)
        return {"video_max": F.normalize(v, dim=-1), "text_max": F.normalize(t, dim=-1)}

    def loss(self, out, ids, cols, offset, tau):
        s = out["logit_scale"]
        return 0.5 * (
            masked_ce(s * out["video_max"] @ cols["text_max"].t(), offset, ids, cols["ids"])
            + masked_ce(s * out["text_max"] @ cols["video_max"].t(), offset, ids, cols["ids"])
        )

    def scores(self, emb, tau):
        return emb["video_max"] @ emb["text_max"].t()


SIMILARITY_HEADS.register("maxpool")(MaxPoolHead)

DRIVER = """
import sys
import tests.e2e.test_heads           # registers the maxpool head
from sclslt.train.main import main
from sclslt.selection import reference as export_reference
argv, out = sys.argv[1:-1], sys.argv[-1]
code = main(argv)
if code == 0:
    run = argv[argv.index("--train.run_dir") + 1]
    code = export_reference.main(["--run", run, "--early", "epoch0000", "--late", "epoch0001",
                                  "--score", "maxpool", "--out", out])
sys.exit(code)
"""


def test_a_head_registered_in_a_test_file_trains_evaluates_and_exports_a_table(tiny_cfg_dict, tmp_path):
    from sclslt.data.corpus import resolve_shards_dir
    from sclslt.eval.retrieval import embed_split
    from sclslt.model.heads import get_head
    from sclslt.runtime.checkpoints import load_module_state
    from sclslt.runtime.rundir import RunDir, load_run_model
    from sclslt.selection.table import load_table

    cfg = yaml.safe_load(yaml.safe_dump(tiny_cfg_dict))
    cfg["data"]["synthetic"]["n_train"] = 32
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run, table_path = tmp_path / "run", tmp_path / "maxpool.safetensors"
    argv = [
        "--config",
        str(cfg_path),
        "--train.run_dir",
        str(run),
        "--model.similarity",
        "maxpool",
        "--stage2.enabled",
        "false",
        "--checkpoint.every_epochs",
        "1",
        "--eval.select",
        "last",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, *argv, str(table_path)],
        cwd=ROOT,
        env=TRAIN_ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Spearman rank correlation of pooled vs maxpool" in proc.stdout

    # trained with the head: its loss was logged, and the parts it trains moved
    rd = RunDir(run)
    lines = rd.metrics("stage1").read_text().splitlines()
    assert "nce" in lines[0].split(",") and len(lines) > 1
    start, end = (load_module_state(rd.checkpoints("stage1"), t) for t in ("epoch0000", "epoch0001"))
    assert not torch.allclose(start["video_proj.weight"], end["video_proj.weight"])

    # evaluated and exported with the head: the table's delta is its score matrix, late minus early
    head = get_head("maxpool")
    views = []
    for tag in ("epoch0000", "epoch0001"):
        model, tok, rcfg = load_run_model(run, rd.checkpoints("stage1"), tag)
        views.append(
            embed_split(
                model,
                resolve_shards_dir(rcfg.data),
                "train",
                tok,
                "cpu",
                head="maxpool",
                max_frames=rcfg.data.max_frames,
            )
        )
    assert views[1]["video_max"].shape == (32, rcfg.model.embed_dim)
    table = load_table(table_path)
    want = head.scores(views[1], rcfg.model.cico_tau) - head.scores(views[0], rcfg.model.cico_tau)
    assert table.delta is not None and torch.allclose(table.delta, want.double(), atol=1e-5)
    from safetensors import safe_open

    with safe_open(str(table_path), framework="pt") as f:
        assert json.loads(f.metadata()["meta"])["score"] == "maxpool"

    # a name nobody registered is a config error naming the registered heads
    bad = subprocess.run(
        [sys.executable, "launch/train.py", *argv], cwd=ROOT, env=TRAIN_ENV, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "model.similarity='maxpool'" in bad.stderr and "'cico'" in bad.stderr
