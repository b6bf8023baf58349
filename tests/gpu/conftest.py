"""GPU tiers, marked `gpu` and skipped (reported as skipped) where the machine lacks what they need.

- one GPU (tests/gpu/test_one_gpu.py): streams, events and a real NCCL ring to self, world size 1;
- two GPUs (tests/gpu/test_gpu.py, also marked `two_gpus`): both DDPs over NCCL, rank against rank.

make test-gpu        # = python -m pytest -q -m gpu tests/gpu: every tier this machine can run
"""

from __future__ import annotations

import pytest
import torch


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config, items):
    n = gpus()
    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU (NCCL); run with `make test-gpu` on such a machine")
    one = pytest.mark.skip(reason=f"needs two CUDA GPUs (NCCL), {n} visible; the one-GPU tier ran instead")
    for item in items:
        if "gpu" not in item.keywords:
            continue
        if n == 0:
            item.add_marker(no_cuda)
        elif n < 2 and "two_gpus" in item.keywords:
            item.add_marker(one)
