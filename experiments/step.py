"""One optimizer step: the step the training loop takes and every benchmark times.

Gradient accumulation, the fp16 loss scaler, gradient clipping and the learning-rate schedule
live here once. experiments/train.py calls `optimizer_step` for each global batch; the
benchmarks (experiments/bench/common/wrappers.py, `timed_step`) call the same function and add only
a barrier and two clock readings around it, so a measured step is a step training runs.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field

import torch

from .precision import autocast


@dataclass
class StepResult:
    """What one optimizer step did, and when.

    Attributes:
        loss: mean of the micro-batches' losses (float; this rank's micro-batches).
        lr: the learning rate this step used.
        skipped: fp16 only: the scaler found inf/NaN gradients and skipped the update.
        scale: the fp16 loss scale before the step (None without a scaler).
        intervals: (kind, start, end) with kind "forward" / "backward" (one pair per micro-batch)
            and "optimizer" (clipping, the update, the schedule), perf_counter seconds.
    """

    loss: float
    lr: float
    skipped: bool = False
    scale: float | None = None
    intervals: list[tuple[str, float, float]] = field(default_factory=list)

    def seconds(self, kind: str) -> float:
        """Seconds spent in intervals of `kind` ("forward", "backward", "optimizer"), summed."""
        return sum(end - start for k, start, end in self.intervals if k == kind)


def wait_for_device(device: torch.device) -> None:
    """Block until `device` has finished its queued work (CUDA calls return before the GPU is done),
    so that a clock read next measures the work, not its launch. Nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _no_sync(model, sync_gradients: bool, last: bool):
    """`model.no_sync()` for every micro-batch but the last (for all of them if not `sync_gradients`)."""
    if (last and sync_gradients) or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def clip_grad_norm_(model, opt, max_norm: float) -> torch.Tensor:
    """Clip the gradients' global 2-norm to `max_norm`; returns the norm before clipping.

    Where the gradients are sharded, the object holding the shards clips them (our FSDP:
    `model.clip_grad_norm_`, our ZeRO-2: `opt.clip_grad_norm_`: one all-reduce of the sum of squares,
    ddp_from_scratch/flat_param.py); otherwise torch's, which also handles FSDP2's sharded DTensors.
    """
    for owner in (model, opt):
        if hasattr(owner, "clip_grad_norm_"):
            return owner.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def optimizer_step(
    model,
    opt,
    sched,
    scaler,
    micro_batches: list[dict],
    precision: str,
    max_grad_norm: float,
    sync_gradients: bool = True,
) -> StepResult:
    """One optimizer step over `micro_batches` (gradient accumulation).

    Every micro-batch but the last runs forward and backward inside `model.no_sync()`, so gradients
    only accumulate locally; the last one's backward all-reduces their sum: one all-reduce per
    optimizer step, in torch's DDP and in ours (`no_sync` of both; `--ddp none`: no wrapper, no sync).
    ZeRO-2 and FSDP (ours and torch's fully_shard) have no `no_sync` here: each micro-batch's backward
    reduce-scatters its gradient and the averaged shards add up (the same sum, in another order of
    rounding; k reduce-scatters per step instead of one: experiments/parallel.py).
    Each loss is divided by the number of micro-batches, so the step uses the mean over all of them.
    fp16: the loss is scaled before backward, the gradients unscaled before clipping, and a step with
    inf/NaN gradients is skipped by the scaler (then the schedule does not advance either).

    Args:
        model: the (wrapped) model; `model(**batch).loss` is a scalar tensor.
        opt: the optimizer. sched: a learning-rate scheduler, or None (a constant rate).
        scaler: a `torch.amp.GradScaler` (fp16), or None.
        micro_batches: dicts of tensors on the model's device, `labels` included
            (`input_ids` int64 (B, T), `attention_mask` (B, T) where there is padding).
        precision: "fp32", "fp16" or "bf16" (autocast of forward and loss, precision.py).
        max_grad_norm: clip the gradients' global L2 norm to this; 0 disables clipping.
        sync_gradients: False runs every micro-batch under `no_sync()`: no all-reduce at all
            (the benchmarks' compute-only step).
    """
    device = next(model.parameters()).device
    sync = functools.partial(wait_for_device, device)  # before each clock reading
    intervals, loss_sum = [], 0.0
    for k, batch in enumerate(micro_batches):
        with _no_sync(model, sync_gradients, last=k == len(micro_batches) - 1):
            sync()
            t0 = time.perf_counter()
            with autocast(precision, device):
                loss = model(**batch).loss / len(micro_batches)
            sync()
            t1 = time.perf_counter()
            (scaler.scale(loss) if scaler else loss).backward()  # the last one: returns once gradients are averaged
            sync()
            t2 = time.perf_counter()
        intervals += [("forward", t0, t1), ("backward", t1, t2)]
        loss_sum += loss.item()
    t2 = time.perf_counter()
    lr, skipped, scale = _update(model, opt, sched, scaler, max_grad_norm)
    sync()
    intervals.append(("optimizer", t2, time.perf_counter()))
    return StepResult(loss=loss_sum, lr=lr, skipped=skipped, scale=scale, intervals=intervals)


def _update(model, opt, sched, scaler, max_grad_norm: float) -> tuple[float, bool, float | None]:
    """The update after the last backward: unscale (fp16), clip, step (skipped by the scaler on inf/NaN),
    schedule, zero the gradients. Returns (the rate this step used, skipped, the scale before it or None)."""
    if scaler:
        scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
    if max_grad_norm > 0:
        clip_grad_norm_(model, opt, max_grad_norm)
    lr = sched.get_last_lr()[0] if sched is not None else opt.param_groups[0]["lr"]  # the rate this step uses
    skipped, scale = False, None
    if scaler:
        scale = scaler.get_scale()
        scaler.step(opt)  # skips opt.step() if the gradients hold inf or NaN
        scaler.update()
        skipped = scaler.get_scale() < scale  # the scaler backs off exactly when it skipped
    else:
        opt.step()
    if sched is not None and not skipped:
        sched.step()
    opt.zero_grad(set_to_none=True)
    return lr, skipped, scale
