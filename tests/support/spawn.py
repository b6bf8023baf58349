"""Run a function on N real processes joined in a gloo process group (CPU).

Used by the distributed tests (`from support.spawn import run`): `run(fn, world_size, tmp_path, *args)`
calls `fn(rank, world_size, *args)` in each process after `init_process_group("gloo")` through a
FileStore in `tmp_path`, so parallel test runs never fight over a port. A worker's exception fails
the test with that worker's traceback; the process group timeout bounds a hang inside a collective,
and `deadline_s` bounds everything else: past it every rank is killed and the test fails naming the
ranks still running.

The ranks are forked from the preloaded server of support/forkserver.py (its docstring says why):
each starts in milliseconds, still a fresh process of its own.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from support import forkserver

DEADLINE_S = 300.0  # a whole spawned test body, ranks together; a hang fails within this


def _entry(rank: int, fn, world_size: int, store_path: str, timeout_s: float, args: tuple) -> None:
    torch.set_num_threads(1)  # 2 cores shared by all ranks: avoid oversubscription
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    # The worker passed. Leave without interpreter finalization: with torch 2.13, a gloo worker
    # thread ("pt_gloo_runloop") that outlives destroy_process_group can still be releasing a
    # tensor when Python finalizes; it then needs the GIL, is unwound by pthread_exit, and the
    # process dies by std::terminate (SIGABRT) after the test's work is done. Seen in about 1 run
    # in 4 of a 20-line script (backward + dist.all_reduce, or torch's own DDP); the backtrace and
    # recipe are in docs/troubleshooting.md. A failing worker still raises above as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(fn, world_size: int, tmp_path, *args, timeout_s: float = 60.0, deadline_s: float = DEADLINE_S) -> None:
    """Start `world_size` processes running `fn(rank, world_size, *args)`; raise if any fails.

    Args:
        fn: a module-level function (ranks receive it pickled, by its module and name).
        timeout_s: the process group's timeout (seconds): a collective waiting longer raises in its rank.
        deadline_s: the whole run's limit (seconds); past it every rank is killed.

    Raises:
        torch.multiprocessing.ProcessRaisedException: a rank raised (its traceback in the message).
        torch.multiprocessing.ProcessExitedException: a rank died (a signal, os._exit with an error).
        TimeoutError: `deadline_s` passed; the message names the ranks that were still running.
    """
    store = os.path.join(str(tmp_path), f"store-{fn.__name__}-{world_size}-{os.getpid()}")
    if os.path.exists(store):
        os.remove(store)
    ctx = mp.start_processes(
        _entry,
        args=(fn, world_size, store, timeout_s, args),
        nprocs=world_size,
        join=False,
        start_method=forkserver.context().get_start_method(),
    )
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                running = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                raise TimeoutError(
                    f"{fn.__name__}: ranks {running} of {world_size} still running after {deadline_s:.0f} s"
                )
    finally:
        for p in ctx.processes:  # a timeout, a failed rank or pytest's own timeout: no rank outlives the test
            if p.is_alive():
                p.kill()
        for p in ctx.processes:
            p.join(5)


def world_sizes(*sizes: int) -> list:
    """`sizes` for a parametrization, those above 2 marked slow: 2 ranks is the quick check (one
    addition per element: bit for bit), 3 and more the reordering and uneven cases `make test` adds."""
    return [pytest.param(n, marks=pytest.mark.slow) if n > 2 else n for n in sizes]
