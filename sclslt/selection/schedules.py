"""Curriculum schedules of Pair Selection: the quantile q(alpha) of the sorted Delta a batch takes its
candidates at, alpha = epoch / epochs (docs/paper.md). Each is registered by name in
`sclslt.registry.SCHEDULES` (`selection.schedule`); a new schedule is one function here plus its test.

    easy 0 | hard 1 | linear alpha | sqrt sqrt(alpha) | log log(1 + (b - 1) alpha) / log(b)  (b: selection.log_base)
"""

from __future__ import annotations

import math

from sclslt.registry import SCHEDULES


@SCHEDULES.register("easy")
def easy(a: float, base: float) -> float:
    return 0.0


@SCHEDULES.register("hard")
def hard(a: float, base: float) -> float:
    return 1.0


@SCHEDULES.register("linear")
def linear(a: float, base: float) -> float:
    return a


@SCHEDULES.register("sqrt")
def sqrt(a: float, base: float) -> float:
    return math.sqrt(a)


@SCHEDULES.register("log")
def log(a: float, base: float) -> float:
    return math.log1p((base - 1) * a) / math.log(base)


def curriculum_quantile(schedule: str, alpha: float, base: float = 10.0) -> float:
    """q(alpha) of `schedule`, alpha clipped to [0, 1]."""
    try:
        fn = SCHEDULES.get(schedule)
    except KeyError as e:
        raise ValueError(f"unknown curriculum schedule {schedule!r}: {e.args[0]}") from None
    return fn(min(max(alpha, 0.0), 1.0), base)
