"""The plain ring against the streamed ring (ddp_from_scratch/collectives.py), timed on the CPU over gloo.

    .venv/bin/python docs/examples/ring_forms.py --nproc 2 --mib 25 --reps 10

Every rank all-reduces the same float32 tensor of --mib MiB with our ring, in turns that
alternate between the two forms: `GROUPED_STEPS = True` (the plain ring: one whole chunk per
step, `_ring_grouped`) and False (the streamed ring: SEGMENT_BYTES pieces, WINDOW in flight,
`_ring`). A barrier before each call; each time is the slowest rank's; prints the medians (ms)
and their ratio. Both forms give the same sums (tests/ddp/test_collectives.py).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, nproc: int, mib: int, reps: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=nproc)
    from ddp_from_scratch import collectives

    tensor = torch.randn(mib * 2**20 // 4)
    times: dict[str, list[float]] = {"plain": [], "streamed": []}
    for i in range(reps + 2):  # two warm-up rounds
        for form in ("plain", "streamed") if i % 2 else ("streamed", "plain"):
            collectives.GROUPED_STEPS = form == "plain"
            dist.barrier()
            start = time.perf_counter()
            collectives.all_reduce(tensor)
            slowest = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            if i >= 2:
                times[form].append(slowest.item())
    if rank == 0:
        med = {form: 1e3 * statistics.median(ts) for form, ts in times.items()}
        print(f"{nproc} ranks, gloo, {mib} MiB float32, {reps} rounds each, interleaved")
        for form, ms in med.items():
            print(f"{form:9s} median {ms:.1f} ms")
        print(f"plain / streamed: {med['plain'] / med['streamed']:.2f}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--mib", type=int, default=25)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.nproc, args.mib, args.reps, port), nprocs=args.nproc)


if __name__ == "__main__":
    main()
