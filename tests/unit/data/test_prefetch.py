"""The loader's batches one step ahead on the device (sclslt/data/prefetch.py): the same batches in the same order,
a loader error raised in the training thread when its batch would have come, no more than `ahead` batches taken
early, and the thread gone when a stage stops mid-epoch."""

import threading

import pytest
import torch

from sclslt.data.loader import Batch
from sclslt.data.prefetch import on_device


def _batch(i: int) -> Batch:
    mask = torch.ones(2, 3, dtype=torch.bool)
    return Batch(
        frames=torch.full((2, 3, 4, 4, 3), i, dtype=torch.uint8),
        frame_mask=mask,
        input_ids=torch.ones(2, 5, dtype=torch.long),
        attention_mask=torch.ones(2, 5, dtype=torch.long),
        labels=torch.ones(2, 5, dtype=torch.long),
        sentence_ids=torch.tensor([i, i]),
        keys=[i, i],
        texts=["a", "b"],
        frame_index=torch.arange(6),
        lengths=[3, 3],
    )


class _Counting:
    """A loader of `n` batches that fails at batch `fail` (if given) and counts what was taken from it."""

    def __init__(self, n: int, fail: int | None = None):
        self.n, self.fail, self.taken = n, fail, 0

    def __iter__(self):
        for i in range(self.n):
            if i == self.fail:
                raise ValueError(f"shard x: sample {i} is corrupt")
            self.taken += 1
            yield _batch(i)


def _alive() -> bool:
    return any(t.name == "sclslt-prefetch" and t.is_alive() for t in threading.enumerate())


def test_batches_come_in_order_and_errors_where_the_loader_raised_them():
    """Mutation caught: an error swallowed by the thread (the iteration ends early instead; checked)."""
    assert [int(b.frames[0, 0, 0, 0, 0]) for b in on_device(_Counting(7), "cpu")] == list(range(7))
    got = []
    with pytest.raises(ValueError, match="sample 4 is corrupt"):
        for b in on_device(_Counting(7, fail=4), "cpu"):
            got.append(int(b.sentence_ids[0]))
    assert got == [0, 1, 2, 3] and not _alive()


@pytest.mark.parametrize("ahead", [1, 3])
def test_at_most_ahead_batches_are_taken_early_and_the_thread_stops_with_the_stage(ahead):
    """Consumed k batches, the thread has taken at most k + ahead from the loader; leaving the loop mid-epoch stops
    the thread. Mutations caught: no bound on how far the thread runs ahead (it takes all 50; checked), no stop
    when the consumer leaves (the thread waits forever; checked)."""
    loader = _Counting(50)
    it = on_device(loader, "cpu", ahead=ahead)
    for k in range(1, 6):
        next(it)
        for _ in range(100):  # give the thread time to run ahead as far as it may
            if loader.taken >= k + ahead:
                break
            threading.Event().wait(0.01)
        assert k <= loader.taken <= k + ahead, (k, loader.taken)
    it.close()
    assert not _alive()
