"""Communication hooks: what the DDP wrapper does with a full bucket.

A hook takes `(state, bucket)` and returns a `torch.futures.Future` whose value is
the reduced flat gradient tensor (same number of elements as `bucket.buffer`). The
wrapper waits for every future at the end of backward and copies the value back
into the bucket. This is the interface of torch's `DistributedDataParallel.
register_comm_hook` (torch/distributed/algorithms/ddp_comm_hooks/default_hooks.py),
with our `Bucket` in place of torch's `GradBucket` (`bucket.buffer` is an
attribute here, `bucket.buffer()` a method there).

Without a registered hook the wrapper does what torch's reducer does: each
gradient is multiplied by 1/world_size while it is copied into the bucket, and the
bucket is all-reduced with SUM, which averages it. (gloo and NCCL both have ReduceOp.AVG
today; torch's reducer still pre-divides and sums, and so do we: see concepts.md.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import collectives, work


@dataclass
class CommState:
    """What a hook needs to talk to the other ranks.

    Attributes:
        process_group: the group to reduce over (None = the default group).
        world_size: number of ranks in it.
        all_reduce: launches an asynchronous SUM all-reduce of a tensor in place and
            returns a `torch.futures.Future` whose value is that tensor; chosen by
            the wrapper's `all_reduce=` option ("torch" or "ring").
        algorithm: that option's value, for debug logging.
        peers: global ranks this rank exchanges data with in one all-reduce (debug logging).
        all_gather: launches an asynchronous all-gather in place of a flat tensor of n equal
            chunks, this rank's chunk r filled (sparse.py sends embedding rows with it); same
            `all_reduce=` choice.
    """

    process_group: object
    world_size: int
    all_reduce: Callable[[torch.Tensor], torch.futures.Future]
    algorithm: str = "torch"
    peers: tuple = ()
    all_gather: Callable[[torch.Tensor], torch.futures.Future] | None = None


def make_comm_state(process_group, algorithm: str) -> CommState:
    """The CommState for `all_reduce="torch"` or `"ring"`.

    Raises:
        ValueError: any other algorithm name.
    """
    rank, n = dist.get_rank(process_group), dist.get_world_size(process_group)
    glob = (lambda r: dist.get_global_rank(process_group, r)) if process_group is not None else (lambda r: r)
    if algorithm == "torch":  # gloo talks to every other rank
        peers = tuple(glob(r) for r in range(n) if r != rank)
        return CommState(
            process_group, n, torch_all_reduce(process_group), "torch", peers, torch_all_gather(process_group)
        )
    if algorithm == "ring":  # ours receives from rank-1 and sends to rank+1 only
        return CommState(
            process_group,
            n,
            ring_all_reduce(process_group),
            "ring",
            tuple(sorted({glob((rank - 1) % n), glob((rank + 1) % n)} - {glob(rank)})),
            ring_all_gather(process_group),
        )
    raise ValueError(f"all_reduce must be 'torch' or 'ring', got {algorithm!r}")


def torch_all_reduce(process_group) -> Callable[[torch.Tensor], torch.futures.Future]:
    """`dist.all_reduce(SUM, async_op=True)` as a launcher whose future's value is the tensor itself."""

    def launch(tensor: torch.Tensor) -> torch.futures.Future:
        # NCCL: the collective runs on ProcessGroupNCCL's own stream after an event of this one; its
        # future carries the device, so `.then()` and `wait()` synchronise streams (no host sync)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    return launch


def ring_all_reduce(process_group) -> Callable[[torch.Tensor], torch.futures.Future]:
    """Our ring all-reduce (collectives.py, from send/recv) as a launcher, SUM, asynchronous.

    `work.Work.get_future()` is a real `torch.futures.Future`, completed by the group's worker
    thread (work.py), so hooks can chain `.then()` on it exactly as on gloo's.
    """

    def launch(tensor: torch.Tensor) -> torch.futures.Future:
        return work.launch(collectives.all_reduce, tensor, group=process_group).get_future()

    return launch


def torch_all_gather(process_group) -> Callable[[torch.Tensor], torch.futures.Future]:
    """`dist.all_gather_single` (async) as an in-place launcher: chunk r of the flat tensor is this rank's part."""
    # torch >= 2.13 renamed all_gather_into_tensor; GPU users may run an older torch
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    rank, n = dist.get_rank(process_group), dist.get_world_size(process_group)

    def launch(tensor: torch.Tensor) -> torch.futures.Future:
        mine = tensor.view(-1).tensor_split(n)[rank].clone()  # the input must not alias the output
        work = gather(tensor.view(-1), mine, group=process_group, async_op=True)
        return work.get_future().then(lambda fut: tensor)

    return launch


def ring_all_gather(process_group) -> Callable[[torch.Tensor], torch.futures.Future]:
    """Our ring all-gather (collectives.py, in place), asynchronous on the group's worker (work.py)."""

    def launch(tensor: torch.Tensor) -> torch.futures.Future:
        return work.launch(collectives.all_gather, tensor, group=process_group).get_future()

    return launch


def allreduce_hook(state: CommState, bucket) -> torch.futures.Future:
    """Average the bucket: divide by world size, then SUM all-reduce (torch's `default_hooks.allreduce_hook`)."""
    bucket.buffer.div_(state.world_size)
    return state.all_reduce(bucket.buffer)


def _compress_hook(dtype: torch.dtype):
    def hook(state: CommState, bucket) -> torch.futures.Future:
        # Halve the bytes on the wire: cast to 16 bits, divide before the sum so the
        # fp16 range (max 65504) is not exceeded by adding world_size gradients.
        compressed = bucket.buffer.to(dtype).div_(state.world_size)
        fut = state.all_reduce(compressed)
        return fut.then(lambda f: _decompress(f, bucket.buffer))

    hook.__name__ = f"{str(dtype).removeprefix('torch.')}_compress_hook"
    hook.__doc__ = (
        f"Average the bucket in {dtype}: half the bytes of float32 on the wire, at the cost of "
        f"rounding every gradient to {dtype} (torch's `default_hooks.{hook.__name__}`)."
    )
    return hook


def _decompress(fut: torch.futures.Future, buffer: torch.Tensor) -> torch.Tensor:
    """`.then()` callback: copy the reduced 16-bit tensor back into the float32 bucket `buffer`.

    Streams (CUDA): the callback runs with a pool stream current that already waits for the
    all-reduce (both futures carry their devices: NCCL's, and work.py's), so reading `fut.value()`
    here is safe and the future records the compressed tensor on this stream before it can be
    freed. `buffer` was allocated on the default stream and is written on this one: record it
    here, or rebuilt buckets could free it while the copy is still queued. The future this
    callback returns records its own event on this stream, which the reducer's `wait()` waits for.
    """
    reduced = fut.value()
    if buffer.is_cuda:
        buffer.record_stream(torch.cuda.current_stream(buffer.device))
    return buffer.copy_(reduced)  # decompress into the bucket


fp16_compress_hook = _compress_hook(torch.float16)
bf16_compress_hook = _compress_hook(torch.bfloat16)
