"""Run a function on N real processes joined in a gloo process group (CPU).

Used by the distributed tests (`from support.spawn import run`): `run(fn, world_size, tmp_path, *args)` calls
`fn(rank, world_size, *args)` in each process after `init_process_group("gloo")`
through a FileStore in `tmp_path`, so parallel test runs never fight over a port.
A worker's exception fails the test with that worker's traceback; the process
group timeout bounds any hang.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


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


def run(fn, world_size: int, tmp_path, *args, timeout_s: float = 60.0) -> None:
    """Spawn `world_size` processes running `fn(rank, world_size, *args)`; raise if any fails."""
    store = os.path.join(str(tmp_path), f"store-{fn.__name__}-{world_size}-{os.getpid()}")
    if os.path.exists(store):
        os.remove(store)
    mp.spawn(_entry, args=(fn, world_size, store, timeout_s, args), nprocs=world_size, join=True)
