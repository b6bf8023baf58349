"""Fault injection for the fault-tolerance tests: a process that kills itself at a chosen point.

tests/harness/test_fault_tolerance.py sets DISTRINEWS_FAULT, launches training under torchrun
(`--max-restarts`), and checks that the restarted ranks resume bit-identical. The points are
called by experiments/train.py (after an optimizer step) and experiments/snapshot.py (between a
snapshot's temporary file and its rename). Unset, they cost one environment lookup.

The emulated cluster (experiments/cluster/) learns here when a step is reached: at the steps
of its `--fault`s, every rank reports the step in a file and waits until the launcher has applied
the fault (`cluster_step_reached`), so a fault "at step K" always hits step K+1, on every rank.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

FAULT_ENV = "DISTRINEWS_FAULT"
CLUSTER_DIR_ENV = "DISTRINEWS_CLUSTER_DIR"  # set by experiments/cluster/: where ranks report steps
CLUSTER_STEPS_ENV = "DISTRINEWS_CLUSTER_STEPS"  # comma-separated steps at which the launcher acts
CLUSTER_WAIT_S = 120.0  # a rank waits at most this long for the launcher, then goes on


def first_attempt() -> bool:
    """False in a run torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0): faults happen once."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0


def fault_point(where: str, step: int) -> None:
    """Kill this process with SIGKILL if DISTRINEWS_FAULT asks for a crash here (for tests only).

    DISTRINEWS_FAULT="<where>:<step>:<rank>", e.g. "after-step:7:1" (rank 1 dies after optimizer
    step 7) or "before-rename:8:0" (rank 0 dies while writing the snapshot of step 8, between the
    temporary file and its rename). Only in a first attempt: a run torchrun restarted
    (TORCHELASTIC_RESTART_COUNT > 0) never injects, so it can finish.
    """
    if where == "after-step":
        cluster_step_reached(step)
    spec = os.environ.get(FAULT_ENV)
    if not spec or not first_attempt():
        return
    kind, at_step, at_rank = spec.split(":")
    rank = int(os.environ.get("RANK", "0"))
    if kind == where and int(at_step) == step and int(at_rank) == rank:
        print(f"[fault injection] rank {rank} kills itself ({where}, step {at_step})", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def cluster_step_reached(step: int) -> None:
    """Under experiments/cluster/, after optimizer step `step`: if the launcher has a fault for it,
    write `<dir>/step-<step>-rank-<rank>` and wait for `<dir>/go-<step>` (the fault applied).

    Every rank pauses between two steps, so nothing is in flight when a link goes down or a node
    is killed, and the fault hits the next step's collectives on every rank. Only in a first
    attempt (a restarted run reaches the step again and must not wait). The wait is bounded
    (CLUSTER_WAIT_S): a launcher that is gone never leaves a rank waiting for ever. The pause is
    outside the step's clock (train.py starts it after this call).
    """
    folder = os.environ.get(CLUSTER_DIR_ENV)
    steps = os.environ.get(CLUSTER_STEPS_ENV, "")
    if not folder or str(step) not in steps.split(",") or not first_attempt():
        return
    rank = os.environ.get("RANK", "0")
    Path(folder, f"step-{step}-rank-{rank}").touch()
    go = Path(folder, f"go-{step}")
    deadline = time.monotonic() + CLUSTER_WAIT_S
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
