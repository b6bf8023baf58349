"""What separates our ring all-reduce from gloo's, at 25 MB: its parts, its settings, the machine's limits.

    python -m experiments.bench.ring --out runs/bench/ring            # 2 and 4 ranks, about a minute
    python -m experiments.bench.ring --quick --out runs/bench/ring    # 2 ranks, 1 MB, seconds

On the same float32 tensor of S bytes, every rank, in turns that rotate (slowest rank's time after
a barrier, median over runs), it times:
- gloo's `dist.all_reduce`, and our ring (`collectives.all_reduce`) at its defaults
  (SEGMENT_BYTES 4 MiB pieces, WINDOW 2 receives in flight) and at other settings: more, smaller
  messages, or more of them in flight;
- the ring's halves alone: our all-gather (transport only, no arithmetic) against gloo's
  `all_gather_into_tensor`, the same (n-1)/n S bytes per rank;
- the limits of this machine: one `add_` over the (n-1)/n S bytes a rank reduces (the ring's
  arithmetic, in one kernel), `copy_` of S bytes (memory bandwidth of one core: loopback TCP
  copies every byte at least twice, user to kernel and kernel to user), and the loopback path
  itself: every rank sends S/n bytes to the next rank and receives S/n from the previous one as
  ONE message each (one `isend`/`irecv` pair, all in C++), which is what one ring step moves;
  the ring needs 2(n-1) such steps.
- the fixed cost of one message: 1 MiB of such a step cut into 1 KB pieces (the bytes are
  negligible, so time / messages = cost per message: Python, gloo's per-message work).

The ideal ring here is 2(n-1) x (one step's transport) with the adds hidden in the pipeline; what
is above it is per-message overhead (Python, the worker thread, gloo's per-message work) and
adds that do not overlap.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from ddp_from_scratch import collectives
from experiments.launch import Cluster

from .common.intervals import slowest_median
from .common.launch import launch_ranks
from .common.report import network, part_main, write_result

FULL = dict(nbytes=25 * 2**20, runs=40)
QUICK = dict(nbytes=2**20, runs=2)
# (SEGMENT_BYTES, WINDOW): collectives' own defaults first (4 MiB, 2), then smaller pieces, more in flight
SETTINGS = [(4 << 20, 2), (1 << 20, 2), (2 << 20, 2), (1 << 20, 4), (256 << 10, 4)]


def _ring_with(segment: int, window: int):
    def fn(t):
        old = collectives.SEGMENT_BYTES, collectives.WINDOW
        collectives.SEGMENT_BYTES, collectives.WINDOW = segment, window
        try:
            collectives.all_reduce(t)
        finally:
            collectives.SEGMENT_BYTES, collectives.WINDOW = old

    return fn


def _step(piece_bytes: int | None, limit_bytes: int | None = None):
    """One ring step's transport: S/n bytes (at most `limit_bytes`) to the next rank, as many from
    the previous, in pieces of `piece_bytes` (None: one message), all receives posted at once."""

    def fn(t):
        rank, n = dist.get_rank(), dist.get_world_size()
        chunk = t.tensor_split(n)[0][: None if limit_bytes is None else limit_bytes // 4]
        out = torch.empty_like(chunk)
        size = chunk.numel() if piece_bytes is None else max(1, piece_bytes // 4)
        recvs = [dist.irecv(p, src=(rank - 1) % n) for p in out.split(size)]
        sends = [dist.isend(p, dst=(rank + 1) % n) for p in chunk.split(size)]
        for w in recvs + sends:
            w.wait()

    return fn


def worker(nbytes: int, runs: int, show_progress: bool = False) -> dict:
    """One rank: every operation `runs` times in rotating order; seconds per run (this rank's)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    x = torch.randn(nbytes // 4)
    buf, other = torch.empty_like(x), torch.empty_like(x)
    part = x[: x.numel() * (n - 1) // n]
    gathered = torch.empty(x.numel() // n * n)
    ops = {"gloo all-reduce": dist.all_reduce}
    ops |= {f"ring all-reduce, {s >> 10} KiB x {w}": _ring_with(s, w) for s, w in SETTINGS}
    ops |= {
        "gloo all-gather": lambda t: dist.all_gather_into_tensor(gathered, t[: gathered.numel() // n]),
        "ring all-gather": collectives.all_gather,
        "one ring step, one message": _step(None),
        "1 MiB in 1 KB messages": _step(1024, 2**20),
        "add_ of (n-1)/n S": lambda t: part.add_(other[: part.numel()]),
        "copy_ of S": lambda t: other.copy_(t),
    }
    names = list(ops)
    times = {k: [] for k in names}
    for i in range(runs + 1):  # the first round warms up
        for k in range(len(names)):
            name = names[(i + k) % len(names)]
            buf.copy_(x)
            dist.barrier()
            t0 = time.perf_counter()
            ops[name](buf)
            if i:
                times[name].append(time.perf_counter() - t0)
    return {"times_s": times, "small_messages": -(-min(x.numel() // n, 2**18) // 256)}  # 1 KB pieces


def run(out_dir: Path, quick: bool = False, nprocs: str = "2,4", cluster: Cluster | None = None) -> dict:
    """Launch the ranks for each world size, then write ring.json and ring.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = QUICK if quick else FULL
    worlds = [2] if quick else [int(x) for x in str(nprocs).split(",")]
    tables = {}
    for n in worlds:
        ranks = launch_ranks("ring", n, cfg, quiet=quick, cluster=cluster)
        names = list(ranks[0]["times_s"])
        ms = {k: 1e3 * slowest_median([r["times_s"][k] for r in ranks]) for k in names}
        per_message_ms = ms["1 MiB in 1 KB messages"] / ranks[0]["small_messages"]
        ideal = 2 * (n - 1) * ms["one ring step, one message"]
        tables[n] = {"ms": ms, "per_message_ms": per_message_ms, "ideal_ring_ms": ideal}
    S = cfg["nbytes"]
    md = [
        f"float32, S = {S / 2**20:.0f} MiB, gloo over {network(cluster)}; median of {cfg['runs']} runs, slowest rank.",
        "",
    ]
    for n, t in tables.items():
        md += [f"**{n} ranks**", "", "| operation | ms | vs gloo all-reduce |", "|---|---|---|"]
        base = t["ms"]["gloo all-reduce"]
        md += [f"| {k} | {v:.2f} | {v / base:.2f} |" for k, v in t["ms"].items()]
        md += [
            "",
            f"- ideal ring from the loopback step: 2(n-1) x one step = {t['ideal_ring_ms']:.2f} ms "
            f"({t['ideal_ring_ms'] / base:.2f} of gloo); one of our messages costs "
            f"{1e3 * t['per_message_ms']:.0f} us; "
            f"copy_ bandwidth {S / t['ms']['copy_ of S'] / 1e6:.1f} GB/s",
            "",
        ]
    return write_result(out_dir, "ring", md, {"config": cfg, "tables": tables}, cluster=cluster, tables=tables)


def main(argv=None) -> None:
    part_main("ring", __doc__, run, argv, lambda p: p.add_argument("--nprocs", default="2,4", help="world sizes"))


if __name__ == "__main__":
    main()
