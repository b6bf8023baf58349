"""Mixed precision: autocast for the forward pass, a gradient scaler for fp16.

`--precision fp32|fp16|bf16`. Under autocast (torch.amp) the matrix products of the forward pass
and the loss run in 16 bits while the parameters, their gradients and the optimizer stay fp32:
so both DDPs all-reduce fp32 gradients, as torch's DDP does under autocast. fp16 has a small
range (smallest normal 6e-5): small gradients underflow to zero unless the loss is multiplied by
a large factor before backward and the gradients divided by it afterwards, which is what
`torch.amp.GradScaler` does (it lowers the factor and skips the step when gradients overflow).
bf16 has fp32's range and needs no scaler; it runs on CPUs too, which is how the tests check it.
On GPUs, bf16 tensor cores start with compute capability 8.0 (Ampere: A100, RTX 30xx); below it (a
T4 is 7.5, a V100 7.0) torch emulates bf16 through fp32 (`torch.cuda.is_bf16_supported()` is true by
emulation), so a run is correct but slow: `make_scaler` warns then, and does not refuse.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(precision: str, device: torch.device):
    """The autocast context for `precision` on `device` (fp32: a context that does nothing)."""
    dtype = DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(precision: str, device: torch.device):
    """A `torch.amp.GradScaler` for fp16; None for fp32 and bf16. Made once per run, so it also
    warns (`bf16_warning`) when bf16 would be emulated on this GPU."""
    message = bf16_warning(precision, device)
    if message:
        warnings.warn(message, stacklevel=2)
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def bf16_warning(precision: str, device: torch.device) -> str | None:
    """Why `--precision bf16` is a poor choice on `device`, or None when it is fine (CPU, fp32/fp16, sm >= 8.0).

    Warned, not refused: below compute capability 8.0 bf16 still gives correct results (emulated in
    fp32), only slower than fp32 itself; fp16 with the scaler is what such a GPU runs fast (its tensor
    cores). Sources: NVIDIA's CUDA C Programming Guide, "Compute Capabilities" (bf16 arithmetic from
    8.0); torch.cuda.is_bf16_supported(including_emulation=True), the default.
    """
    if precision != "bf16" or device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return None
    return (
        f"--precision bf16 on {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}): this GPU "
        "has no bf16 arithmetic (it starts with 8.0), so torch emulates it and the run is correct but slower than "
        "fp32. Use --precision fp16 (its tensor cores, with the gradient scaler) on this GPU."
    )
