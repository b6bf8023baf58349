"""Watch chunks travel round the ring: pdb inside our ring all-reduce on rank 0, while the others wait.

From the repository root:

    torchrun --nproc_per_node=2 docs/examples/ring_breakpoint.py   # torchrun starts the ranks
    python docs/examples/ring_breakpoint.py                        # this script starts them itself
    python docs/examples/ring_breakpoint.py --nproc 3              # a longer ring
    python docs/examples/ring_breakpoint.py --ddp                  # step through reducer.py instead

Ring mode (default). Every rank holds a small float32 tensor whose digits say whose it is
(rank 0: 1 2 3 4, rank 1: 10 20 30 40, rank 2: 100 ...) and calls `collectives.all_reduce` on
it, blocking, so the ring runs on the main thread where pdb can follow it. The ring is the
plain one (`_ring_grouped`: one whole chunk per step, `GROUPED_STEPS = True`), the form the
exercise, concepts.md and the interview notes teach. Rank 0 stops at the call with
breakpoints already set in ddp_from_scratch/collectives.py (see `RING_STOPS`); type `c` to run
to the first. Every other rank prints each message it sends or receives (by wrapping
`dist.batch_isend_irecv`, through which the plain ring sends and receives), so you see it wait
for rank 0 while rank 0 sits at the prompt.

DDP mode (`--ddp`). Every rank wraps a 17-parameter model in our DistributedDataParallel
(all_reduce="ring", 32-byte buckets so there are two) and takes one backward. Rank 0 stops
before `loss.backward()` with breakpoints on the reducer's `_mark_variable_ready`, `_all_reduce_bucket` and
`_finalize_backward` (reducer.py).
The ring then runs on the "collectives-worker" thread, which pdb does not stop: watch rank 1
finish an all-reduce while rank 0's main thread is paused (that is the overlap).

Only rank 0 reads the terminal (`/dev/stdin`, like `torch.distributed.breakpoint`), and the
process group gets a long timeout (`--timeout`, default 3600 s), so waiting ranks do not give
up while you read. Leave with `c` until the end (or `cl` to clear breakpoints, then `c`).

Scripted (docs/examples/debugging_transcript.py, which writes docs/debugging.md's transcripts):
with PDB_COMMANDS set (one pdb command a line), rank 0 reads its commands from there instead of
the terminal and echoes each after its prompt.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import io
import os
import pdb
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from ddp_from_scratch import collectives as C
from ddp_from_scratch.ddp import DistributedDataParallel
from ddp_from_scratch.reducer import Reducer

# Where rank 0 stops in collectives.py: the entry of the ring kernel that `all_reduce` runs,
# and each (function, text of a line in it, stop on the line after it?) found below. If
# collectives.py is reorganised, adjust these; a missing one is skipped, not an error.
RING_KERNELS = ("_ring_grouped",)
RING_STOPS = [
    ("_ring_grouped", "send = c", False),  # a step is over: chunk `c` received (and added in): `t`, `c`, `flat`
]


class TerminalPdb(pdb.Pdb):
    """pdb that reads the terminal even if the launcher gave this process another sys.stdin
    (torch.distributed's `_DistributedPdb` does the same)."""

    def interaction(self, *args, **kwargs):
        saved = sys.stdin
        try:
            with open("/dev/stdin") as sys.stdin:
                pdb.Pdb.interaction(self, *args, **kwargs)
        finally:
            sys.stdin = saved


class ScriptedPdb(pdb.Pdb):
    """pdb reading its commands from a string (one a line) and echoing each after its prompt, as typed."""

    def __init__(self, commands: str):
        super().__init__(stdin=io.StringIO(commands.strip() + "\n"), stdout=sys.stdout)
        self.use_rawinput = False

    def precmd(self, line):
        self.stdout.write(line.rstrip("\n") + "\n")
        return super().precmd(line)


def make_pdb() -> pdb.Pdb:
    """Rank 0's debugger: the terminal's, or the commands of PDB_COMMANDS (a scripted session)."""
    commands = os.environ.get("PDB_COMMANDS")
    return ScriptedPdb(commands) if commands else TerminalPdb()


def say(text: str) -> None:
    """Print in one write, so lines of ranks sharing the terminal do not interleave mid-line."""
    sys.stdout.flush()  # pdb's own output first (a scripted session writes to a pipe)
    os.write(sys.stdout.fileno(), (text + "\n").encode())


def fmt(t: torch.Tensor) -> list:
    """A tensor as a short list of numbers (4 significant digits)."""
    return [float(f"{v:.4g}") for v in t.flatten().tolist()]


def find_line(func, needle: str, after: bool) -> tuple[str, int] | None:
    """(file, line) of the first line of `func` containing `needle` (or the line after it)."""
    func = inspect.unwrap(func)
    lines, first = inspect.getsourcelines(func)
    for k, text in enumerate(lines):
        if needle in text:
            return inspect.getsourcefile(func), first + k + (1 if after else 0)
    return None


def set_ring_breakpoints(dbg: pdb.Pdb) -> list[str]:
    """Set the breakpoints of RING_KERNELS and RING_STOPS that exist in collectives.py; describe them."""
    done = []
    kernel = next((getattr(C, k) for k in RING_KERNELS if hasattr(C, k)), None)
    if kernel is not None:
        kernel = inspect.unwrap(kernel)  # the kernels are wrapped by @torch.no_grad()
        dbg.set_break(inspect.getsourcefile(kernel), kernel.__code__.co_firstlineno, funcname=kernel.__name__)
        done.append(f"entry of {kernel.__name__}")
    for name, needle, after in RING_STOPS:
        func = getattr(C, name, None)
        where = func and find_line(func, needle, after)
        if where:
            dbg.set_break(*where)
            done.append(f"{os.path.relpath(where[0])}:{where[1]} ({name}, {'after' if after else 'at'} `{needle}`)")
    return done or ["none found (collectives.py changed?): step into all_reduce with s"]


class TracedWork:
    """A `dist.irecv` request that prints when someone waits for it and when the data is there."""

    def __init__(self, work, tensor: torch.Tensor, src: int, rank: int):
        self.work, self.tensor, self.src, self.rank = work, tensor, src, rank

    def wait(self, *args, **kwargs):
        say(f"[rank {self.rank}]   waiting for a message from rank {self.src} ...")
        start = time.perf_counter()
        out = self.work.wait(*args, **kwargs)
        say(
            f"[rank {self.rank}]   received {fmt(self.tensor)} from rank {self.src} "
            f"after {time.perf_counter() - start:.1f} s"
        )
        return out

    def __getattr__(self, name):
        return getattr(self.work, name)


def show_messages(rank: int) -> None:
    """On a rank without a debugger: print every point-to-point message of our collectives.

    collectives.py calls `dist.batch_isend_irecv` (the plain ring) and `dist.isend` / `dist.irecv`
    (the streamed ring) through the module at call time, so replacing the module's functions is
    enough. The plain ring's `dist.P2POp` accepts only torch's own isend/irecv, so in ring mode
    (`C.GROUPED_STEPS`) only `batch_isend_irecv` is wrapped.
    """
    real_isend, real_irecv, real_batch = dist.isend, dist.irecv, dist.batch_isend_irecv

    def batch_isend_irecv(ops):
        for op in ops:
            if op.op is real_isend:
                say(f"[rank {rank}]   send {fmt(op.tensor)} to rank {op.peer}")
        works = real_batch(ops)
        if len(works) != len(ops):  # one coalesced request for all: nothing to attribute
            return works
        return [TracedWork(w, op.tensor, op.peer, rank) if op.op is real_irecv else w for w, op in zip(works, ops)]

    dist.batch_isend_irecv = batch_isend_irecv
    if C.GROUPED_STEPS:
        return

    def isend(tensor, dst=None, group=None, tag=0, **kwargs):
        say(f"[rank {rank}]   send {fmt(tensor)} to rank {dst}")
        return real_isend(tensor, dst=dst, group=group, tag=tag, **kwargs)

    def irecv(tensor, src=None, group=None, tag=0, **kwargs):
        return TracedWork(real_irecv(tensor, src=src, group=group, tag=tag, **kwargs), tensor, src, rank)

    dist.isend, dist.irecv = isend, irecv


def ring_demo(rank: int, n: int) -> None:
    C.GROUPED_STEPS = True  # the plain ring, one whole chunk per step (the streamed `_ring` is the optimisation)
    x = torch.arange(1, 2 * n + 1, dtype=torch.float32) * 10**rank  # rank 1: 10 20 30 40
    expected = x.clone()
    dist.all_reduce(expected)  # gloo's answer, to check ours against
    say(f"[rank {rank}] before: {fmt(x)}  (n={n} chunks of 2: chunk i = elements 2i, 2i+1)")
    dist.barrier()
    if rank == 0:
        dbg = make_pdb()
        where = set_ring_breakpoints(dbg)
        dbg.message(
            f"\n[rank 0] breakpoints: {'; '.join(where)}.\n"
            "  c = continue to it;  ll = show the function;  p t, c, flat;  n = next line;  "
            "cl = clear breakpoints\n"
        )
        dbg.set_trace()
        C.all_reduce(x)  # blocking: the ring runs on this thread, so pdb follows it
    else:
        show_messages(rank)
        C.all_reduce(x)
    verdict = "same" if torch.equal(x, expected) else "DIFFERENT"
    say(f"[rank {rank}] after:  {fmt(x)}  (gloo: {fmt(expected)}, {verdict})")


def ddp_demo(rank: int, n: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))  # 17 numbers
    cap = 32 / 2**20  # 32-byte buckets (8 floats): [bias 2, weight 2], then [bias 0, weight 0]
    ddp = DistributedDataParallel(model, bucket_cap_mb=cap, first_bucket_cap_mb=cap, all_reduce="ring")
    say(f"[rank {rank}] buckets (parameter indices, launch order): {[b.param_indices for b in ddp.reducer.buckets]}")
    if rank != 0:
        show_messages(rank)  # here the ring runs on the "collectives-worker" thread, during backward
    torch.manual_seed(1 + rank)  # a different micro-batch on every rank
    loss = ddp(torch.randn(4, 2)).square().mean()
    if rank == 0:
        dbg = make_pdb()
        for name in ("_mark_variable_ready", "_all_reduce_bucket", "_finalize_backward"):
            func = getattr(Reducer, name)
            dbg.set_break(inspect.getsourcefile(func), func.__code__.co_firstlineno, funcname=name)  # = `b name`
        dbg.message(
            "\n[rank 0] breakpoints on Reducer._mark_variable_ready, _all_reduce_bucket and _finalize_backward.\n"
            "  c = continue;  p index;  p [b.pending for b in self.buckets];  p bucket.index;  "
            "bt = who called us;  n, s;  cl = clear breakpoints\n"
        )
        dbg.set_trace()
    loss.backward()
    say(f"[rank {rank}] backward done; averaged gradients: {[fmt(p.grad) for p in model.parameters()]}")


def worker(args) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank, n = dist.get_rank(), dist.get_world_size()
    try:
        (ddp_demo if args.ddp else ring_demo)(rank, n)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Done: leave without Python's finalization, where gloo's worker thread can abort the process after a
    # backward (docs/troubleshooting.md, "terminate called without an active exception at exit").
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def launch(args) -> int:
    """A tiny torchrun: start `--nproc` copies of this script with RANK etc. set; they share our terminal."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(args.nproc):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(args.nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env=env))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        codes = [p.wait() for p in procs]
    return max(codes, key=abs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="ranks to start (plain python only)")
    parser.add_argument("--ddp", action="store_true", help="step through reducer.py instead of the bare ring")
    parser.add_argument("--timeout", type=float, default=3600.0, help="process-group timeout, seconds")
    args = parser.parse_args()
    if "RANK" in os.environ:
        worker(args)
    elif args.nproc < 2:
        parser.error("--nproc must be at least 2: a ring of one rank sends nothing")
    else:
        sys.exit(launch(args))
