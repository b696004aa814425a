"""The preemption flag: SIGTERM and SIGUSR1 (a scheduler's warning before it kills or requeues the
job) ask for a checkpoint at the next step boundary and a clean exit (code 75).

Kept free of heavy imports so that the entry point installs the handlers first thing: a signal that
arrives while torch, DeepSpeed or the data are still loading is remembered, not fatal.
"""

from __future__ import annotations

import signal
import threading

PREEMPT = threading.Event()


def install_signal_handlers() -> None:
    def handler(signum, frame):
        PREEMPT.set()

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)
