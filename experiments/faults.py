"""Fault injection for the fault-tolerance tests: a process that kills itself at a chosen point.

tests/test_fault_tolerance.py sets DISTRINEWS_FAULT, launches training under torchrun
(`--max-restarts`), and checks that the restarted ranks resume bit-identical. The points are
called by experiments/train.py (after an optimizer step) and experiments/snapshot.py (between a
snapshot's temporary file and its rename). Unset, they cost one environment lookup.
"""

from __future__ import annotations

import os
import signal
import sys

FAULT_ENV = "DISTRINEWS_FAULT"


def fault_point(where: str, step: int) -> None:
    """Kill this process with SIGKILL if DISTRINEWS_FAULT asks for a crash here (for tests only).

    DISTRINEWS_FAULT="<where>:<step>:<rank>", e.g. "after-step:7:1" (rank 1 dies after optimizer
    step 7) or "before-rename:8:0" (rank 0 dies while writing the snapshot of step 8, between the
    temporary file and its rename). Only in a first attempt: a run torchrun restarted
    (TORCHELASTIC_RESTART_COUNT > 0) never injects, so it can finish.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    kind, at_step, at_rank = spec.split(":")
    rank = int(os.environ.get("RANK", "0"))
    if kind == where and int(at_step) == step and int(at_rank) == rank:
        print(f"[fault injection] rank {rank} kills itself ({where}, step {at_step})", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
