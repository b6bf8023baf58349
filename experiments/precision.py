"""Mixed precision: autocast for the forward pass, a gradient scaler for fp16.

`--precision fp32|fp16|bf16`. Under autocast (torch.amp) the matrix products of the forward pass
and the loss run in 16 bits while the parameters, their gradients and the optimizer stay fp32:
so both DDPs all-reduce fp32 gradients, as torch's DDP does under autocast. fp16 has a small
range (smallest normal 6e-5): small gradients underflow to zero unless the loss is multiplied by
a large factor before backward and the gradients divided by it afterwards, which is what
`torch.amp.GradScaler` does (it lowers the factor and skips the step when gradients overflow).
bf16 has fp32's range and needs no scaler; it runs on CPUs too, which is how the tests check it.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(precision: str, device: torch.device):
    """The autocast context for `precision` on `device` (fp32: a context that does nothing)."""
    dtype = DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(precision: str, device: torch.device):
    """A `torch.amp.GradScaler` for fp16; None for fp32 and bf16."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
