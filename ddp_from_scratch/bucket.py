"""Gradient buckets: many small gradients packed into a few large flat tensors.

Why buckets? One all-reduce has a fixed cost (latency: a round trip, a kernel
launch) plus a cost per byte. Reducing ~100 parameter tensors one by one pays the
fixed cost ~100 times; reducing everything in one piece at the end of backward
pays it once but cannot overlap with backward at all. Buckets sit in between:
a bucket is reduced as soon as all of its gradients are ready, while backward
goes on computing the gradients of earlier layers (Li et al., "PyTorch
Distributed: Experiences on Accelerating Data Parallel Training", VLDB 2020, §3.2).

How torch's DDP fills them (torch/nn/parallel/distributed.py and
torch/csrc/distributed/c10d/reducer.cpp), and how we do the same:
1. At wrap time, parameters are taken in *reverse* registration order, because
   gradients become ready roughly in reverse order of the forward pass (the last
   layer's gradient is computed first).
2. Buckets are filled greedily up to a byte cap; the first bucket has a small cap
   (1 MiB) so the first all-reduce starts early, the rest use `bucket_cap_mb` (25 MiB).
   A bucket holds one dtype and one device, so its flat buffer has one dtype.
3. After the first iteration the buckets are rebuilt once, in the order gradients
   *actually* became ready (rank 0's order, shared with every rank), since the
   registration order is only a guess.

Two details where torch (2.x, distributed.py `_BucketCapacityConfig`) differs: it uses
the 1 MiB first bucket only when `bucket_cap_mb` is left at its default (an explicit
value caps the first bucket too), and without `find_unused_parameters` its very first
iteration puts every gradient into one bucket, since the rebuild fixes the layout anyway.
With `find_unused_parameters=True` it never rebuilds: its buckets stay as first assigned
(registration order, the 1 MiB cap on the first-registered parameters), where ours are
reversed and rebuilt; the sums are the same.
Our first cap is the explicit `first_bucket_cap_mb` (1 MiB), from the first iteration on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MB = 1024 * 1024  # bucket caps are in MiB, like torch's `bucket_cap_mb`


def assign_buckets(params: list[torch.Tensor], order: list[int], caps_bytes: list[int]) -> list[list[int]]:
    """Group parameter indices into buckets, in the given order, by size.

    Args:
        params: all parameters that get gradients (index i = params[i]).
        order: indices of `params` in the order their gradients are expected to be ready;
            each index at most once. Parameters left out get no bucket (the reducer
            exchanges sparse embedding weights apart, sparse.py).
        caps_bytes: byte caps; bucket k of a (dtype, device) group is capped at
            `caps_bytes[min(k, len(caps_bytes) - 1)]`, so `[1 MiB, 25 MiB]` gives a
            small first bucket, like torch's `_DEFAULT_FIRST_BUCKET_BYTES`. A parameter
            joins the open bucket first; the bucket closes once it holds >= its cap. So a
            parameter larger than the cap shares its bucket with those before it, and no
            bucket minus its last member reaches the cap (reducer.cpp's
            `compute_bucket_assignment_by_size` does the same).

    Returns:
        Buckets as lists of parameter indices, ordered by when each bucket is expected
        to be full (the position of its first member in `order`).
    """
    if len(set(order)) != len(order) or not all(0 <= i < len(params) for i in order):
        raise ValueError(f"order must list distinct indices of 0..{len(params) - 1}")
    open_buckets: dict[tuple, list[int]] = {}  # (dtype, device) -> bucket being filled
    open_bytes: dict[tuple, int] = {}
    n_closed: dict[tuple, int] = {}  # how many buckets of this group are closed (picks the cap)
    buckets: list[list[int]] = []
    for i in order:
        p = params[i]
        key = (p.dtype, p.device)
        if key not in open_buckets:
            open_buckets[key], open_bytes[key] = [], 0
            buckets.append(open_buckets[key])  # position fixed by its first member
        open_buckets[key].append(i)
        open_bytes[key] += p.numel() * p.element_size()
        cap = caps_bytes[min(n_closed.get(key, 0), len(caps_bytes) - 1)]
        if open_bytes[key] >= cap:  # close it; the next parameter of this group opens a new one
            del open_buckets[key]
            n_closed[key] = n_closed.get(key, 0) + 1
    return buckets


@dataclass
class Bucket:
    """One flat gradient buffer and the parameters whose gradients live in it.

    Attributes:
        index: position in the launch order; every rank launches bucket 0, 1, 2, ...
            in this order, so the k-th all-reduce on one rank always pairs with the
            k-th on every other rank.
        param_indices: indices (into the wrapper's parameter list) of the members.
        buffer: 1-D tensor of the members' dtype and device, `sum(numel)` elements,
            holding their gradients back to back.
        views: one view of `buffer` per member, shaped like that parameter.
        pending: members whose gradient has not been copied in yet this iteration.
        future: the in-flight all-reduce of `buffer` (None until launched).
    """

    index: int
    param_indices: list[int]
    params: list[torch.Tensor]
    buffer: torch.Tensor
    views: list[torch.Tensor]
    pending: int = 0
    future: object = None

    @classmethod
    def create(cls, index: int, param_indices: list[int], params: list[torch.Tensor]) -> Bucket:
        """Allocate the zeroed flat buffer for `params` and its shaped views."""
        numels = [p.numel() for p in params]
        buffer = torch.zeros(sum(numels), dtype=params[0].dtype, device=params[0].device)
        views, offset = [], 0
        for p, n in zip(params, numels):
            views.append(buffer[offset : offset + n].view_as(p))
            offset += n
        return cls(index, list(param_indices), list(params), buffer, views, len(params))

    @property
    def nbytes(self) -> int:
        """Size of the flat buffer in bytes (what one all-reduce of it moves in)."""
        return self.buffer.numel() * self.buffer.element_size()

    def reset(self) -> None:
        """Make ready for the next backward: every member pending, nothing in flight."""
        self.pending = len(self.params)
        self.future = None


def build_buckets(params: list[torch.Tensor], order: list[int], caps_bytes: list[int]) -> list[Bucket]:
    """`assign_buckets`, then allocate a `Bucket` for each group; returns them in launch order."""
    groups = assign_buckets(params, order, caps_bytes)
    return [Bucket.create(k, g, [params[i] for i in g]) for k, g in enumerate(groups)]


def rebuild_in_ready_order(
    params: list[torch.Tensor], ready_order: list[int], caps_bytes: list[int], broadcast, move_grads: bool
) -> list[Bucket]:
    """New buckets in the order gradients became ready on rank 0 (reducer.cpp `rebuild_buckets`).

    Each rank saw its own order (`ready_order`, recorded during the first synced backward);
    `broadcast(order_tensor)` overwrites it with rank 0's, so every rank builds identical
    buckets and the k-th all-reduce still pairs up across ranks. With `move_grads`
    (gradient_as_bucket_view), existing gradients are copied into the new buckets and
    `param.grad` re-pointed at them, as reducer.cpp's `initialize_bucket_views` does.
    """
    # on the parameters' device: NCCL only sends GPU tensors
    order = torch.tensor(ready_order, dtype=torch.int64, device=params[0].device if params else "cpu")
    broadcast(order)
    buckets = build_buckets(params, order.tolist(), caps_bytes)
    if move_grads:
        for b in buckets:
            for p, view in zip(b.params, b.views):
                if p.grad is not None:
                    view.copy_(p.grad)
                    p.grad = view
    return buckets
