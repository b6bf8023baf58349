"""Processes and everything they started: is one alive, which are below it, stop the whole tree.

A step with a time limit (the GPU check's) runs torchrun, which runs ranks, which may run their own
children, each rank in a session of its own: killing the direct child leaves its ranks holding the
GPU. So the tree is read from /proc (Linux; where it is missing, only the direct child is found) and
every process group in it is signalled: SIGTERM first (torchrun forwards it to its ranks), SIGKILL
after a grace period. The cluster's watchdog asks the same "still alive?" of its nodes' agents.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

KILL_GRACE_S = 5.0  # after SIGTERM, before SIGKILL (seconds)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...), read from /proc; [] where there is none."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ...": comm may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def signal_all(pids: list[int], sig: int) -> None:
    """`sig` to each of `pids` and to its process group, never to this process's own group."""
    own = os.getpgrp()
    for pid in pids:
        try:
            group = os.getpgid(pid)
            if group != own:
                os.killpg(group, sig)
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def stop_tree(proc: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
    """Stop `proc` (a session leader: `start_new_session=True`) and everything it started: SIGTERM to
    every group in the tree (torchrun forwards it to its ranks, each in a session of its own), then
    SIGKILL to what is left after `grace_s`. Reaps `proc`."""
    tree = [proc.pid, *descendants(proc.pid)]
    signal_all(tree, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p) for p in tree):
        time.sleep(0.05)
    tree += [p for p in descendants(proc.pid) if p not in tree]
    signal_all([p for p in tree if p == proc.pid or alive(p)], signal.SIGKILL)
    proc.wait()
