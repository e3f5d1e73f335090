"""Named fault points, where the fault-injection tests stop the process (RELIABILITY.md).

Off unless a test sets ``DANCE_FAULT_AT`` to ``NAME`` or ``NAME:K`` (the K-th time this process
reaches NAME, from 1). ``DANCE_FAULT_ACTION`` says what happens there: ``kill`` (default: SIGKILL
to itself, as ``kill -9`` or the OOM killer would), ``interrupt`` (SIGINT to its whole process
group, as Ctrl-C in a terminal does) or ``terminate`` (SIGTERM to itself, as a batch scheduler
stopping a job). With ``DANCE_FAULT_LOG`` set, every point reached is
appended to that file (one ``NAME K`` line), so a test can list the points of a run and pick some.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

_hits: Counter = Counter()
_fired = False
# read once, when dance is imported: fault points sit in the training step
_AT = os.environ.get("DANCE_FAULT_AT")
_LOG = os.environ.get("DANCE_FAULT_LOG")
_ACTION = os.environ.get("DANCE_FAULT_ACTION", "kill")


def fault_point(name: str) -> None:
    """Test-only: stop here when ``DANCE_FAULT_AT`` names this point (module docstring)."""
    global _fired
    if _AT is None and _LOG is None:
        return
    _hits[name] += 1
    k = _hits[name]
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(f"{name} {k}\n")
    if _fired or _AT not in (name, f"{name}:{k}"):
        return
    _fired = True  # once per process: unwinding from an interrupt may pass here again
    if _ACTION == "interrupt":
        os.killpg(os.getpgrp(), signal.SIGINT)
    elif _ACTION == "terminate":
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        os.kill(os.getpid(), signal.SIGKILL)
