"""Run under experiments/cluster.py by tests/cluster/test_cluster.py: time a 25 MiB gloo all-reduce
(with the argument `sleep`: only sleep, for the cleanup test).

Each rank joins the gloo group torchrun set up, all-reduces a 25 MiB float32 tensor three times
(the first warms the connections up), checks the sum, and rank 0 prints the fastest time:
`allreduce 26214400 bytes <seconds> s`.
"""

import datetime
import sys
import time

import torch
import torch.distributed as dist

if sys.argv[1:] == ["sleep"]:  # for the cleanup test: a node that only waits to be killed
    print("sleeping", flush=True)
    time.sleep(120)
    sys.exit(0)
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
rank, world = dist.get_rank(), dist.get_world_size()
x = torch.full(((25 << 20) // 4,), float(rank + 1))
times = []
for _ in range(3):
    dist.barrier()
    t0 = time.perf_counter()
    dist.all_reduce(x)
    times.append(time.perf_counter() - t0)
    assert float(x[0]) == float(x[-1]), "all-reduce gave different values"
    x.fill_(float(rank + 1))
if rank == 0:
    print(f"allreduce {x.numel() * 4} bytes {min(times):.4f} s", flush=True)
dist.destroy_process_group()
