"""The checkpoint policy (sclslt/runtime/checkpointer.py): which boundary saves which tag, and what
rotation keeps. The engine here only publishes directories the way `Engine.save` does (tag directory,
sclslt.json, `latest`); the real engine's saves run in the end-to-end tests (test_checkpoint_selection,
test_faults, test_distributed)."""

from __future__ import annotations

import json

import pytest

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
    assert retained(tags, 0, set(), step_tag(12)) == set(tags)  # keep 0: all
    assert step_tag(12) > step_tag(9) and epoch_tag(3) == "epoch0003"  # zero-padded: sortable


def test_boundaries_decide_the_saves_and_rotation_keeps_the_best(tmp_path):
    state = {"step": 0, "epoch": 0}
    best = set()
    eng = Publisher()
    ck = Checkpointer(
        eng,
        tmp_path,
        every_steps=2,
        every_epochs=1,
        keep=1,
        record=lambda: dict(state),
        protect=lambda: set(best),
        config={},
    )
    assert ck.at("start", 0) == "epoch0000"
    for step in range(1, 7):
        state["step"] = step
        ck.at("step", step, 0, total=6)
        if step == 2:
            best.add(ck.at("best", step) or step_tag(2))  # the state at step 2 is published already
        if step == 3:
            state["epoch"] = 1
            ck.at("epoch", step, 1)
    assert ck.at("step", 6, 1, total=6) is None  # the last step: the end saves it
    assert ck.at("end", 6) == step_tag(6)
    assert ck.at("end", 6) is None  # this very state is published already
    assert eng.saved == ["epoch0000", step_tag(2), "epoch0001", step_tag(4), step_tag(6)]
    on_disk = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert on_disk == ["epoch0000", "epoch0001", step_tag(2), step_tag(6)]  # keep 1 + the best
    assert latest_tag(tmp_path) == step_tag(6)


def _checkpoint(d, tag: str, step: int, checksummed: bool = True):
    from sclslt.runtime.checkpoints import write_checksums

    c = d / tag
    (c / "zero").mkdir(parents=True)
    (c / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 8)
    (c / "zero" / "optim_states.pt").write_bytes(b"\x01" * 3000)
    (c / "sclslt.json").write_text(
        json.dumps({"tag": tag, "step": step, **({"checksummed": True} if checksummed else {})})
    )
    if checksummed:
        write_checksums(c, 0, 1)
    (d / "latest").write_text(tag)
    return c


def test_checksums_name_each_damage_and_the_resume_falls_back_to_the_newest_intact(tmp_path, capsys):
    """Mutation caught (checked): only the latest damaged checkpoint named when none is intact."""
    from sclslt.runtime.checkpoints import damaged, intact_tag

    old = _checkpoint(tmp_path, "step00000002", 2, checksummed=False)  # written before checksums
    mid = _checkpoint(tmp_path, "step00000004", 4)
    new = _checkpoint(tmp_path, "step00000006", 6)
    assert damaged(tmp_path, "step00000002") is None and damaged(tmp_path, "step00000006") == []
    assert intact_tag(tmp_path) == "step00000006"
    f = new / "zero" / "optim_states.pt"
    f.write_bytes(b"\x01" * 1500 + b"\x00" + b"\x01" * 1499)  # one byte flipped
    assert damaged(tmp_path, "step00000006") == ["zero/optim_states.pt changed since it was written (sha256)"]
    assert intact_tag(tmp_path) == "step00000004"
    assert latest_tag(tmp_path) == "step00000004"  # the damaged one is not latest now
    (tmp_path / "latest").write_text("step00000006")
    err = capsys.readouterr().err
    assert "step00000006 is damaged: zero/optim_states.pt changed" in err and "resuming from" in err
    (mid / "mp_rank_00_model_states.pt").write_bytes(b"\x00" * 100)  # truncated
    (mid / "zero" / "optim_states.pt").unlink()
    assert damaged(tmp_path, "step00000004") == [
        "mp_rank_00_model_states.pt has 100 bytes, 2048 were written",
        "zero/optim_states.pt missing",
    ]
    assert intact_tag(tmp_path) == "step00000002"  # nothing to verify: loaded
    (tmp_path / "latest").write_text("step00000006")
    (new / "checksums.json").unlink()  # the record itself lost
    assert damaged(tmp_path, "step00000006") == ["checksums.json missing"]
    (old / "sclslt.json").write_text("{trunc")
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="no intact checkpoint"):
        intact_tag(tmp_path)
    err = capsys.readouterr().err  # each damaged checkpoint named, with what is wrong with it
    assert "step00000006 is damaged: checksums.json missing" in err
    assert (
        "step00000004 is damaged: mp_rank_00_model_states.pt has 100 bytes, 2048 were written; "
        "zero/optim_states.pt missing"
    ) in err
    assert "step00000002 is damaged: sclslt.json" in err


def test_loading_the_weights_of_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    from sclslt.runtime.checkpoints import load_module_state

    c = _checkpoint(tmp_path, "step00000002", 2)
    (c / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 7 + bytes(255 - i for i in range(256)))
    with pytest.raises(RuntimeError, match="mp_rank_00_model_states.pt changed since it was written"):
        load_module_state(tmp_path)
