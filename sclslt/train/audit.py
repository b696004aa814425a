"""The audit trail of a stage, `<run_dir>/<stage>/batches.jsonl`: which samples made each optimizer step."""

from __future__ import annotations

import json
import math
from pathlib import Path

from sclslt.atomic import write_text


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf  # a line cut short by a crash: dropped with the rest after the step


class BatchLog:
    """The audit trail `<run_dir>/<stage>/batches.jsonl`: one JSON line per optimizer step,
    {"step", "epoch", "keys"} with the sample keys of the whole global batch in global order (rank 0
    writes it). A resume first drops the lines after the step it continues from (written after the last
    checkpoint by a job that then died), so the file has one line per step, none twice: two runs that
    should be the same compare with `diff`."""

    def __init__(self, path: Path, enabled: bool, step: int):
        self.path, self.enabled = path, enabled
        if enabled and path.is_file():
            write_text(path, "".join(ln + "\n" for ln in path.read_text().splitlines() if _step_of(ln) <= step))

    def write(self, step: int, epoch: int, keys: list[str]) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "epoch": epoch, "keys": list(keys)}) + "\n")
