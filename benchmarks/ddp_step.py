"""Step time of the hand-written DDP against torch's DDP, same model, data and bucket cap.

    torchrun --nproc_per_node=2 benchmarks/ddp_step.py --model minilm-l6 --batch-size 16 --seq-len 64

Each rank builds the model once (seeded, so identical everywhere) and wraps one deep
copy per implementation: native DDP, ours with `dist.all_reduce` ("scratch-torch"),
ours with the ring all-reduce from send/recv ("scratch-ring"). The implementations
then take turns, one training step each (forward, backward, AdamW step), for
--steps rounds after --warmup rounds, so slow drifts of the machine (another process,
thermal throttling) hit all of them alike; the order rotates every round, so no
implementation always runs first (it matters: caches, the allocator). Reported:
median and mean step time in ms, and the median over rounds of each one's step time
divided by the first implementation's step time in the same round (paired ratio). Random token ids: the content of the
batch does not change the time of a dense forward/backward.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])  # run as a script from anywhere

import ddp_native  # noqa: E402
import ddp_from_scratch  # noqa: E402
from experiments.model import build_model, build_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm-l6", help="preset or path (minilm-l6, tiny, ...)")
    p.add_argument("--batch-size", type=int, default=16, help="micro-batch per rank")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="measured rounds (one step per implementation each)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bucket-cap-mb", type=float, default=None, help="default: torch's (25 MiB, first 1 MiB)")
    p.add_argument("--impls", default="native,scratch-torch,scratch-ring")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    vocab = len(build_tokenizer(args.model))
    torch.manual_seed(0)
    base = build_model(args.model, vocab_size=vocab, dropout=0.0) if args.model == "tiny" else build_model(args.model)
    wrappers = {}
    for name in args.impls.split(","):
        m = copy.deepcopy(base)
        if name == "native":
            wrappers[name] = ddp_native.wrap(m, torch.device("cpu"), bucket_cap_mb=args.bucket_cap_mb)
        else:
            wrappers[name] = ddp_from_scratch.wrap(m, torch.device("cpu"), bucket_cap_mb=args.bucket_cap_mb,
                                                   all_reduce=name.removeprefix("scratch-"))
    opts = {n: torch.optim.AdamW(w.parameters(), lr=1e-5) for n, w in wrappers.items()}
    g = torch.Generator().manual_seed(rank)
    times: dict[str, list[float]] = {n: [] for n in wrappers}
    for i in range(args.warmup + args.steps):
        ids = torch.randint(min(1000, vocab // 2), vocab, (args.batch_size, args.seq_len), generator=g)
        labels = torch.randint(0, 4, (args.batch_size,), generator=g)
        names = list(wrappers)
        for name in names[i % len(names):] + names[:i % len(names)]:  # rotate the order
            model = wrappers[name]
            dist.barrier()  # all ranks start the step together, as in training
            t0 = time.perf_counter()
            model(input_ids=ids, labels=labels).loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    first = next(iter(times))
    result = {"world_size": world, "model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "bucket_cap_mb": args.bucket_cap_mb, "steps": args.steps, "impls": {}}
    for name, ts in times.items():
        med = statistics.median(ts)
        paired = statistics.median(t / r for t, r in zip(ts, times[first]))
        result["impls"][name] = {"median_ms": med * 1e3, "mean_ms": statistics.mean(ts) * 1e3,
                                 "ratio_to_first": paired}
    if rank == 0:
        print(f"{world} ranks, {args.model}, batch {args.batch_size} x {args.seq_len} tokens, "
              f"bucket cap {args.bucket_cap_mb or 'default'} MB, {args.steps} steps each (interleaved)")
        print(f"{'implementation':16s} {'median ms':>10s} {'mean ms':>10s} {'paired ratio':>13s}")
        for name, r in result["impls"].items():
            print(f"{name:16s} {r['median_ms']:10.1f} {r['mean_ms']:10.1f} {r['ratio_to_first']:13.3f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    del wrappers, opts, model  # release the process group's users before destroying it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
