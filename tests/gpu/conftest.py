"""GPU tests: marked `gpu`, skipped (and reported as skipped) unless two CUDA devices are visible.

make test-gpu        # = python -m pytest -q -m gpu tests/gpu
"""

from __future__ import annotations

import pytest
import torch


def two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


def pytest_collection_modifyitems(config, items):
    if two_gpus():
        return
    skip = pytest.mark.skip(reason="needs two CUDA GPUs (NCCL); run with `make test-gpu` on such a machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
