"""The command line of a short real training: experiments.train on the tiny model and real AG News rows.

`tiny_train_args(out_dir, ...)` is that argv without `python -m experiments.train` (prepend it for a
command; pass it as is to `parse_args` or `main`): `--data-dir <AG_NEWS> --model tiny`, the sample
counts, `--max-length 32`, `--epochs 1`, one flag per further keyword argument, `--cache-dir` and
`--output-dir` when given, written by `TrainConfig.to_argv` (field order; a value equal to the option's
default is left out). A keyword is a TrainConfig field: `batch_size=4` -> `--batch-size 4`,
`no_test=True` -> `--no-test`; None or False leaves the flag out (`epochs=None`: the option's default).
Each test file keeps its own values; this says the shape once.

`recorded_steps(log)` records, at the first optimizer steps of a training, the parameters and the
averaged gradient before clipping: the point where runs that add in different orders, or clip by
norms summed in different orders, can still be compared (AdamW amplifies the rest).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

from experiments.train_args import TrainConfig
from support.paths import AG_NEWS


def tiny_train_args(
    out_dir: Path | None,
    *,
    max_train_samples: int,
    max_eval_samples: int,
    cache_dir: Path | None = None,
    max_length: int = 32,
    epochs: int | None = 1,
    **flags,
) -> list[str]:
    """experiments.train's options for the tiny model on `max_train_samples` real rows (see the module's docstring),
    rendered by the config itself (`TrainConfig.to_argv`: a misspelled option is a TypeError here)."""
    fields = dict(data_dir=str(AG_NEWS), model="tiny", max_train_samples=max_train_samples)
    fields |= dict(max_eval_samples=max_eval_samples, max_length=max_length)
    fields |= {k: v for k, v in {**flags, "epochs": epochs}.items() if v is not None}
    paths = {"cache_dir": cache_dir, "output_dir": out_dir}
    fields |= {k: str(v) for k, v in paths.items() if v is not None}
    return TrainConfig(**fields).to_argv()


@contextlib.contextmanager
def recorded_steps(log: list, steps: int = 2, terms: bool = False, norms: list | None = None):
    """While inside, every optimizer step that experiments.step's `optimizer_step` takes (experiments.train's
    `train()`, or a direct call) appends to `log`, for its first `steps` steps, this rank's record:

        {"state": the full state dict before the step, "grads": the averaged gradient before clipping,
         "norm": the norm clipping measured (clipping must be on), "terms": see below}

    by parameter name, gathered where the stage shards them (support/sharded.py's views: collective,
    so every rank must take the same steps). Only clipping is intercepted: `optimizer_step` calls it
    between the last backward and the update.

    norms: if given, every step's norm (all steps, not only the first) is appended to it.
    terms: also "terms", S = sum over ranks and micro-batches of |g_rk / (n k)| (float64, all-reduced):
    the magnitudes that the averaged gradient adds up, from a plain copy of the unwrapped model on
    each micro-batch (needs a model without dropout, and a DDP-style `.module` or an unwrapped model).
    """
    import torch.distributed as dist

    import experiments.step as step
    from support.sharded import view_of

    clip, take = step.clip_grad_norm_, step.optimizer_step
    pending: dict = {}

    def recording_step(model, opt, sched, scaler, micro_batches, *args, **kwargs):
        if terms and len(log) < steps:
            plain = copy.deepcopy(getattr(model, "module", model))
            n = dist.get_world_size() if dist.is_initialized() else 1
            out = {}
            for batch in micro_batches:
                plain.zero_grad(set_to_none=True)
                (plain(**batch).loss / len(micro_batches)).backward()
                for name, p in plain.named_parameters():
                    if p.grad is not None:
                        t = p.grad.double().abs()
                        out[name] = out[name] + t if name in out else t
            for t in out.values():
                if n > 1:
                    dist.all_reduce(t)
                t /= n
            pending["terms"] = out
        return take(model, opt, sched, scaler, micro_batches, *args, **kwargs)

    def value(norm) -> float:
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def recording_clip(model, opt, max_norm):
        if len(log) >= steps:
            norm = clip(model, opt, max_norm)
            if norms is not None:
                norms.append(value(norm))
            return norm
        view = view_of(model, opt)
        entry = {"state": view.state(), "grads": view.grads(), **pending}
        pending.clear()
        norm = clip(model, opt, max_norm)
        entry["norm"] = value(norm)
        log.append(entry)
        if norms is not None:
            norms.append(entry["norm"])
        return norm

    import experiments.train as train_module

    step.clip_grad_norm_, step.optimizer_step, train_module.optimizer_step = (
        recording_clip,
        recording_step,
        recording_step,
    )
    try:
        yield log
    finally:
        step.clip_grad_norm_, step.optimizer_step, train_module.optimizer_step = clip, take, take
