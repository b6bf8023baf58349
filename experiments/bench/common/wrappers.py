"""What a benchmark worker trains: the model and batches, the DDP wrappers with their bucket
all-reduces timed, and the training step with clocks around it.

- `wrap(impl, module, bucket_cap_mb)`: the module wrapped by one of `IMPLS`, with its bucket
  all-reduces recorded as {"bucket", "bytes", "launch", "done"} (perf_counter seconds), through
  experiments/comm_timing.py: ours through its own timeline (`Reducer.timeline`); torch's DDP
  through a comm hook that averages exactly like its default path.
- `timed_step(model, opt, micro_batches)`: a barrier, so that all ranks start together as in
  training, then experiments/step.py's `optimizer_step` (the step training takes: accumulation
  under `no_sync()`, scaler, clipping), and the clock. Returns the intervals, in seconds.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from experiments import parallel as P
from experiments.comm_timing import gradient_bytes, place_on_host_clock, record_allreduces, step_origin
from experiments.distributed import rank_device
from experiments.step import optimizer_step
from experiments.train_args import TrainConfig

# The DDPs a benchmark times, built by experiments/parallel.py's table: name -> (implementation, ours'
# collectives). native: torch's DDP; scratch-torch / scratch-ring: ours with dist.all_reduce / our ring.
VARIANTS = {"native": (P.TORCHS, "torch"), "scratch-torch": (P.OURS, "torch"), "scratch-ring": (P.OURS, "ring")}
ONRAMP = {"scratch-naive": "NaiveDistributedDataParallel"}  # naive.py: a blocking all-reduce per parameter
IMPLS = (*VARIANTS, *ONRAMP)
BUCKETED = tuple(VARIANTS)  # the ones with buckets (and so a bucket timeline)


def device() -> torch.device:
    """The device a worker's models and batches live on: this rank's GPU when the process group is NCCL's
    (chosen as training chooses it, `experiments.distributed.rank_device`: cuda:LOCAL_RANK, or cuda:0 where
    each process sees only its own GPU), else the CPU. Read from the process group, so nothing is stored."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return rank_device(int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def model_and_batches(model_name: str, n: int, batch_size: int, seq_len: int, seed: int):
    """The same seeded model on every rank, and `n` random (ids, labels) batches for this rank.

    Random token ids: the content of a batch does not change the time of a dense forward/backward.
    Returns: (model on `device()`, [(ids int64 (batch_size, seq_len), labels int64 (batch_size,))]).
    """
    from experiments.model import build_model, build_tokenizer

    vocab = len(build_tokenizer(model_name))
    torch.manual_seed(0)
    base = build_model(model_name, vocab_size=vocab, dropout=0.0) if model_name == "tiny" else build_model(model_name)
    g = torch.Generator().manual_seed(seed)
    return base.to(device()), [
        (
            torch.randint(min(1000, vocab // 2), vocab, (batch_size, seq_len), generator=g).to(device()),
            torch.randint(0, 4, (batch_size,), generator=g).to(device()),
        )
        for _ in range(n)
    ]


def wrap(
    impl: str,
    module: torch.nn.Module,
    bucket_cap_mb: float | None = None,
    record: bool = True,
    sparse_embeddings="auto",
):
    """`module` wrapped by `impl` (one of IMPLS); returns (model, records).

    `records` is the list that fills with one dict per bucket all-reduce when `record` (None for
    scratch-naive, which has no buckets, or when not recording); ours adds one per sparse
    embedding exchange (bucket "sparse:<name>"). `bucket_cap_mb` (MiB; None = torch's default 25
    with a 1 MiB first bucket) applies to the three bucketed ones alike. `sparse_embeddings`: ours'
    option of that name ("auto": the word embedding's gradient by rows; False: all dense, as torch).
    """
    if impl in ONRAMP:
        import ddp_from_scratch

        return getattr(ddp_from_scratch, ONRAMP[impl])(module), None
    implementation, collectives = VARIANTS[impl]
    options = P.Options(bucket_cap_mb=bucket_cap_mb, all_reduce=collectives, sparse_embeddings=sparse_embeddings)
    model = implementation.ddp(module, options, device())
    return model, record_allreduces(model, native=implementation.native) if record else None


def compress_hook(impl: str, kind: str):
    """`impl`'s (one of VARIANTS) fp16 / bf16 compression hook for `register_comm_hook(None, hook)`."""
    return VARIANTS[impl][0].compress_hook(kind)


def rotated(items: list, i: int) -> list:
    """`items` starting at position i mod len: round i's order, so that every configuration goes
    first in turn and slow drifts of the machine hit all of them alike (the step part's interleaving)."""
    k = i % len(items)
    return items[k:] + items[:k]


def allreduces_per_step(impl: str, model) -> int:
    """All-reduce calls one synced step makes: one per bucket, per parameter for naive, and for ours
    one more (the "got a gradient" counts, unused.py)."""
    if impl in ONRAMP:
        return len(model.params)
    if VARIANTS[impl][0].native:
        return len(model.reducer._get_zeros_like_grad_buckets())  # torch has no public bucket list
    return len(model.reducer.buckets) + 1


def bytes_per_step(impl: str, model) -> dict:
    """Gradient bytes one rank puts into collectives in its last synced step, and sends.

    "into": the tensors handed to all-reduce / all-gather (bytes). "sent": what the ring
    algorithms send per rank for them (bytes): 2 (n-1)/n of an all-reduced tensor (Patarasuk &
    Yuan 2009), (n-1)/n of an all-gathered one; gloo's own algorithms send about as much. Ours
    counts its sparse exchanges (sparse.py records) in place of the embedding's dense gradient.
    """
    n = dist.get_world_size()
    native = impl in ONRAMP or VARIANTS[impl][0].native  # every gradient's bytes, no sparse exchange
    dense, sparse, sparse_sent = gradient_bytes(model, native)  # experiments/comm_timing.py: one arithmetic
    return {"into": dense + sparse, "sent": 2 * (n - 1) / n * dense + sparse_sent}


def timed_step(
    model,
    opt,
    micro_batches: list,
    sync: bool = True,
    precision: str = "fp32",
    scaler=None,
    max_grad_norm: float = TrainConfig.max_grad_norm,
) -> dict:
    """The training step (experiments/step.py's `optimizer_step`), timed: a barrier, then the step.

    Every micro-batch but the last runs under `no_sync()` (every one if not `sync`: no all-reduce
    at all); gradients are clipped to `max_grad_norm` (training's default) and, with an fp16
    `scaler`, scaled. The rate is constant (no schedule: its step costs nothing measurable).
    `micro_batches`: (ids, labels) pairs as `model_and_batches` makes them.
    On CUDA the clocks are read after `torch.cuda.synchronize` (step.py's `wait_for_device`).
    Returns: {"start", "end"} and "intervals": [(kind, start, end)] with kind forward / backward /
    optimizer, perf_counter seconds (one clock for every process on one machine); "origin" (CUDA:
    comm_timing.step_origin's pair, so that `step_events` times the collectives by their events).
    """
    batches = [{"input_ids": ids, "labels": labels} for ids, labels in micro_batches]
    dist.barrier()  # all ranks start the step together, as in training
    origin = step_origin(batches[0]["input_ids"].device)  # CUDA: to place the collectives' events (step_events)
    start = time.perf_counter()
    r = optimizer_step(model, opt, None, scaler, batches, precision, max_grad_norm, sync_gradients=sync)
    return {"start": start, "end": time.perf_counter(), "intervals": r.intervals, "origin": origin}


def step_events(impl: str, rank: int, step: int, timed: dict, records: list | None) -> list[dict]:
    """The events of one timed step (see `timed_step`) and its bucket all-reduces, as flat dicts.

    On CUDA the all-reduces' times come from their CUDA events (comm_timing.place_on_host_clock),
    for torch's DDP and ours alike; on the CPU from the host clock at completion."""
    place_on_host_clock(records or [], timed.get("origin"))
    events = [
        {"impl": impl, "rank": rank, "step": step, "kind": k, "start": a, "end": b} for k, a, b in timed["intervals"]
    ]
    events += [
        {
            "impl": impl,
            "rank": rank,
            "step": step,
            "kind": "allreduce",
            "bucket": r["bucket"],
            "bytes": r["bytes"],
            "start": r["launch"],
            "end": r["done"],
        }
        for r in records or ()
    ]
    return events
