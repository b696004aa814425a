"""The checkpoint policy (sclslt/runtime/checkpointer.py): which boundary saves which tag, and what
rotation keeps. The engine here only publishes directories the way `Engine.save` does (tag directory,
sclslt.json, `latest`); the real engine's saves run in the end-to-end tests (test_checkpoint_selection,
test_faults, test_distributed)."""
from __future__ import annotations

import json

from sclslt.runtime.checkpointer import Checkpointer, epoch_tag, retained, step_tag
from sclslt.runtime.checkpoints import latest_tag


class Publisher:
    rank = 0

    def __init__(self):
        self.saved = []

    def save(self, ckpt_dir, tag, client_state):
        d = ckpt_dir / tag
        d.mkdir(parents=True, exist_ok=True)
        record = {k: v for k, v in client_state["sclslt"].items() if k != "config"}
        (d / "sclslt.json").write_text(json.dumps({"tag": tag, **record}))
        (ckpt_dir / "latest").write_text(tag)
        self.saved.append(tag)


def test_retained_keeps_the_newest_step_tags_the_protected_and_every_epoch_tag():
    tags = ["epoch0000", "epoch0001", step_tag(3), step_tag(6), step_tag(9), step_tag(12)]
    assert retained(tags, 2, set(), step_tag(12)) == {"epoch0000", "epoch0001", step_tag(9), step_tag(12)}
    assert retained(tags, 1, {step_tag(3)}, step_tag(12)) == {"epoch0000", "epoch0001", step_tag(3), step_tag(12)}
    assert retained(tags, 0, set(), step_tag(12)) == set(tags)                      # keep 0: all
    assert step_tag(12) > step_tag(9) and epoch_tag(3) == "epoch0003"             # zero-padded: sortable


def test_boundaries_decide_the_saves_and_rotation_keeps_the_best(tmp_path):
    state = {"step": 0, "epoch": 0}
    best = set()
    eng = Publisher()
    ck = Checkpointer(eng, tmp_path, every_steps=2, every_epochs=1, keep=1, record=lambda: dict(state),
                      protect=lambda: set(best), config={})
    assert ck.at("start", 0) == "epoch0000"
    for step in range(1, 7):
        state["step"] = step
        ck.at("step", step, 0, total=6)
        if step == 2:
            best.add(ck.at("best", step) or step_tag(2))       # the state at step 2 is published already
        if step == 3:
            state["epoch"] = 1
            ck.at("epoch", step, 1)
    assert ck.at("step", 6, 1, total=6) is None                # the last step: the end saves it
    assert ck.at("end", 6) == step_tag(6)
    assert ck.at("end", 6) is None                             # this very state is published already
    assert eng.saved == ["epoch0000", step_tag(2), "epoch0001", step_tag(4), step_tag(6)]
    on_disk = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert on_disk == ["epoch0000", "epoch0001", step_tag(2), step_tag(6)]       # keep 1 + the best
    assert latest_tag(tmp_path) == step_tag(6)
