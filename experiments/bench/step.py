"""Step time of the hand-written DDPs against torch's DDP: same model, data and buckets, interleaved.

    python -m experiments.bench.step --out runs/bench/step            # 2 ranks, minilm-l6, a few minutes
    python -m experiments.bench.step --quick --out runs/bench/step    # tiny model, seconds
    python -m experiments.bench.step --gpu --precision fp16 --out runs/bench/step-gpu   # 2 GPUs, NCCL

Each rank builds the model once (seeded, so identical everywhere) and wraps one deep copy per
implementation (common.wrappers.IMPLS): torch's DDP ("native"), ours with `dist.all_reduce`
("scratch-torch"), ours with the ring from send/recv ("scratch-ring"), and the naive DDP of
naive.py ("scratch-naive": no buckets, no overlap, one blocking all-reduce per parameter). All
bucketed ones use torch's default buckets (25 MiB, first bucket 1 MiB) and no timing hooks. The
implementations then take turns, one training step each (common.wrappers.timed_step: the step
training takes, AdamW; fp16 with a loss scaler), for --steps rounds after --warmup rounds, in
an order that rotates every round, so slow drifts of the machine hit all of them alike and none
always runs first (it matters: caches, the allocator). A round's time is the slowest rank's.

Reported per implementation: median step time (ms), the paired ratio to native (median over
rounds of its time / native's time in the same round), all-reduces per step, how ours exchanged
the word embedding's gradient (sparse.py: by rows, or dense), and the bytes of gradients each
rank puts into collectives and sends per step. With --dense-embeddings ours sends the embedding
dense, as torch's DDP does: run both to see what the sparse exchange buys. The naive row is the
lesson of buckets and overlap, in numbers.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path

import torch
from tqdm.auto import tqdm

from experiments.launch import Cluster
from experiments.precision import make_scaler

from .common.intervals import paired_ratios
from .common.launch import launch_ranks
from .common.report import part_main, write_result
from .common.wrappers import (
    IMPLS,
    allreduces_per_step,
    bytes_per_step,
    device,
    model_and_batches,
    rotated,
    timed_step,
    wrap,
)

# --onramp: the on-ramp's steps 3 and 4 too (ddp_from_scratch/overlap.py, minimal_buckets.py, 25 MiB
# buckets); step 1 (explicit.py) sends what step 2 (scratch-naive) sends, at the same moment.
ONRAMP = ("step-overlap", "step-buckets")
PER_PARAMETER = {"scratch-naive", "step-overlap"}  # one all-reduce per parameter: each gradient travels alone


def _wrap_step(impl: str, module):
    import ddp_from_scratch

    if impl == "step-overlap":
        return ddp_from_scratch.OverlapDistributedDataParallel(module)
    return ddp_from_scratch.BucketedDistributedDataParallel(module)


FULL = dict(model="minilm-l6", steps=20, warmup=3, batch_size=16, seq_len=64)
QUICK = dict(model="tiny", steps=2, warmup=1, batch_size=8, seq_len=32)


def worker(
    model: str,
    precision: str,
    steps: int,
    warmup: int,
    batch_size: int,
    seq_len: int,
    sparse_embeddings="auto",
    show_progress: bool = False,
    onramp: bool = False,
) -> dict:
    """One rank: every implementation takes one step per round; returns seconds per step, counts, bytes."""
    import torch.distributed as dist

    rank = dist.get_rank()
    base, batches = model_and_batches(model, warmup + steps, batch_size, seq_len, seed=rank)
    impls = (*IMPLS, *ONRAMP) if onramp else IMPLS
    models = {
        impl: _wrap_step(impl, copy.deepcopy(base))
        if impl in ONRAMP
        else wrap(impl, copy.deepcopy(base), record=False, sparse_embeddings=sparse_embeddings)[0]
        for impl in impls
    }
    opts = {impl: torch.optim.AdamW(m.parameters(), lr=1e-5) for impl, m in models.items()}
    scalers = {impl: make_scaler(precision, device()) for impl in impls}  # fp16: as training does
    times = {impl: [] for impl in impls}
    rows = {impl: [] for impl in impls}  # sparse exchange: rows sent (K) per step
    for i, batch in enumerate(tqdm(batches, desc="step time", unit="round", disable=not show_progress)):
        for impl in rotated(list(impls), i):  # rotate the order
            t = timed_step(models[impl], opts[impl], [batch], precision=precision, scaler=scalers[impl])
            if i >= warmup:
                times[impl].append(t["end"] - t["start"])
                ex = getattr(getattr(models[impl], "reducer", None), "exchanges", [])
                rows[impl] += [f"{r['mode']} {r['rows']}" for r in ex]
    grad_bytes = sum(p.numel() * p.element_size() for p in base.parameters() if p.requires_grad)
    return {
        "times_s": times,
        "allreduces": {
            impl: (len(m.params) if impl == "step-overlap" else len(m.buckets))
            if impl in ONRAMP
            else allreduces_per_step(impl, m)
            for impl, m in models.items()
        },
        "bytes": {impl: bytes_per_step("scratch-naive" if impl in ONRAMP else impl, m) for impl, m in models.items()},
        "exchanges": rows,
        "grad_bytes": grad_bytes,
    }


def summarize(ranks: list[dict], impls, steps: int) -> dict:
    """One row per implementation: the slowest rank's step times, its median and paired ratio to native,
    all-reduces and bytes per step, and ours' sparse exchanges (what they sent, how many rows)."""
    slowest = {impl: [max(r["times_s"][impl][s] for r in ranks) for s in range(steps)] for impl in impls}
    rows = {
        impl: {
            "median_ms": 1e3 * statistics.median(ts),
            "ratio_to_native": paired_ratios(ts, slowest["native"]),
            "allreduces_per_step": ranks[0]["allreduces"][impl],
            "mib_into_collectives": ranks[0]["bytes"][impl]["into"] / 2**20,
            "mib_sent_per_rank": ranks[0]["bytes"][impl]["sent"] / 2**20,
            "exchanges": sorted(set(x.split()[0] for r in ranks for x in r["exchanges"][impl])),
            "sparse_rows": [int(x.split()[1]) for x in ranks[0]["exchanges"][impl]],
            "step_ms": [1e3 * t for t in ts],
        }
        for impl, ts in slowest.items()
    }
    return rows


def run(
    out_dir: Path,
    quick: bool = False,
    nproc: int = 2,
    gpu: bool = False,
    precision: str = "fp32",
    dense_embeddings: bool = False,
    onramp: bool = False,
    cluster: Cluster | None = None,
) -> dict:
    """Launch the ranks, then write step.json and step.md.

    `gpu`: NCCL, rank r on cuda:r (one GPU per rank); `precision`: autocast of the forward;
    `dense_embeddings`: ours without the sparse embedding exchange (all dense, as torch's DDP).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = {
        **(QUICK if quick else FULL),
        "precision": precision,
        "sparse_embeddings": False if dense_embeddings else "auto",
        "onramp": onramp,
    }
    backend = "nccl" if gpu else "gloo"
    ranks = launch_ranks("step", nproc, cfg, quiet=quick, backend=backend, cluster=cluster)
    rows = summarize(ranks, (*IMPLS, *ONRAMP) if onramp else IMPLS, cfg["steps"])
    mb = ranks[0]["grad_bytes"] / 2**20
    md = [
        f"{nproc} ranks, {backend}, {cfg['model']} ({mb:.1f} MiB of fp32 gradients), {precision}, micro-batch "
        f"{cfg['batch_size']} x {cfg['seq_len']} tokens, AdamW, torch's default buckets, {cfg['steps']} "
        f"interleaved rounds (after {cfg['warmup']} warm-up), order rotated every round; ours with "
        f"sparse_embeddings={cfg['sparse_embeddings']!r}.",
        "",
        "| DDP | median step ms | vs native (paired) | all-reduces per step | embedding exchange | MiB into "
        "collectives per step | MiB sent per rank per step |",
        "|---|---|---|---|---|---|---|",
    ]
    for impl, r in rows.items():
        ex = "/".join(r["exchanges"]) or ("dense, alone" if impl in PER_PARAMETER else "dense, in a bucket")
        if r["sparse_rows"]:
            ex += f", median {statistics.median(r['sparse_rows']):.0f} rows"
        md.append(
            f"| {impl} | {r['median_ms']:.1f} | {r['ratio_to_native']:.3f} | {r['allreduces_per_step']} | {ex} | "
            f"{r['mib_into_collectives']:.1f} | {r['mib_sent_per_rank']:.1f} |"
        )
    md += [
        "",
        "'Sent' counts what ring algorithms send per rank: 2(n-1)/n of each all-reduced byte, (n-1)/n of each "
        "all-gathered one. Every implementation averages the same gradients; they differ in how many messages "
        "carry them, when, and (ours, sparse) whether the embedding's zero rows travel. "
        "Native and ours launch each bucket as soon as it is full and overlap it "
        "with the rest of backward (ours adds one small all-reduce of 'got a gradient' counts, "
        "unused.py); naive.py sends one blocking all-reduce per parameter after backward, so every "
        "fixed per-message cost is paid once per parameter and nothing overlaps.",
    ]
    data = {"config": cfg, "nproc": nproc, "rows": rows}
    return write_result(out_dir, "step", md, data, cluster=cluster, rows=rows, config=cfg)


def _arguments(p) -> None:
    p.add_argument("--gpu", action="store_true", help="one GPU per rank, NCCL (needs --nproc GPUs)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32", help="autocast of the forward")
    p.add_argument("--dense-embeddings", action="store_true", help="ours without the sparse embedding exchange")
    p.add_argument(
        "--onramp", action="store_true", help="also the on-ramp's steps 3 and 4 (overlap.py, minimal_buckets.py)"
    )


def main(argv=None) -> None:
    part_main("step", __doc__, run, argv, _arguments)


if __name__ == "__main__":
    main()
