"""Exercise 7 of 7 (solution: ddp_from_scratch/bucket.py `assign_buckets`): which gradients share a bucket.

Run: make exercise NAME=bucket_plan   (stuck: python -m exercises bucket_plan --hint)
"""

from __future__ import annotations

import torch


def assign_buckets(params: list[torch.Tensor], order: list[int], caps_bytes: list[int]) -> list[list[int]]:
    """Group parameter indices into buckets, in the given order, by size (reducer.cpp
    `compute_bucket_assignment_by_size`).

    Args:
        params: the parameters (index i = params[i]); bytes of one = numel() * element_size().
        order: indices of `params` in the order their gradients are expected (usually reversed).
        caps_bytes: byte caps; bucket k of a (dtype, device) group is capped at
            `caps_bytes[min(k, len(caps_bytes) - 1)]` ([1 MiB, 25 MiB]: a small first bucket).
            A parameter joins the open bucket of its (dtype, device) first; the bucket closes
            once it holds >= its cap. A parameter larger than the cap shares its bucket with
            those before it.

    Returns:
        Buckets as lists of parameter indices, ordered by the position of their first member in `order`.
    """
    raise NotImplementedError("exercise 7: the bucket plan")
