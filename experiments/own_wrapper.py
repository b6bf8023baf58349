"""Your own DDP wrapper in the real training run: `experiments.train --wrapper exercises.step4_buckets`.

The on-ramp exercises (docs/exercises.md) end with a wrapper of your own: an `nn.Module` whose
`__init__(module)` broadcasts rank 0's weights and whose `loss.backward()` leaves every gradient
averaged over the ranks (steps 2 to 4), or step 1's `sync_gradients(model)`. `--wrapper MODULE`
puts it where our DDP would be (`experiments/parallel.py`, `setup`, the one line that calls
`wrap_with`); the data, the sampler, the initial weights, AdamW and the loop stay the same. On 2
ranks every correct average of two float32 gradients is the same number, so the run ends with
the weights of `--ddp native`, bit for bit: `make yours WRAPPER=exercises.step4_buckets` trains both
and prints the largest difference (experiments.compare).

Refused (train_args.py): with --ddp native/none, a sharded stage, --comm-hook, and --grad-accum-steps
above 1 (the exercises' wrappers have no `no_sync`).
"""

from __future__ import annotations

import importlib
import inspect

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd import Variable

from distrinews.errors import UsageError


class AfterBackward(nn.Module):
    """Step 1's `sync_gradients(model)` run at the end of every backward: the training loop never calls
    it, so the call is queued from the first gradient hook (step 2's device, `queue_callback`)."""

    def __init__(self, module: nn.Module, sync_gradients, process_group=None):
        super().__init__()
        from ddp_from_scratch.explicit import broadcast_parameters

        self.module, self._sync, self._group = module, sync_gradients, process_group
        broadcast_parameters(module)
        self._queued = False
        for p in module.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._on_gradient)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _on_gradient(self, _param: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            Variable._execution_engine.queue_callback(self._at_end)

    def _at_end(self) -> None:
        self._queued = False
        self._sync(self.module, self._group)


def _defined_in(mod, kind) -> list:
    return [
        v for v in vars(mod).values() if inspect.isclass(v) and issubclass(v, kind) and v.__module__ == mod.__name__
    ]


def load(spec: str):
    """`spec` ("package.module" or "package.module:Name") -> a callable `make(module) -> nn.Module`.

    The module's wrapper is the one `nn.Module` class defined in it, or, without one, its
    `sync_gradients` function (wrapped in `AfterBackward`).

    Raises:
        UsageError: the module cannot be imported, holds no wrapper (or several: name one with
            `:Name`), or its code still raises NotImplementedError (an unfinished exercise).
    """
    name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(name)
    except ImportError as e:
        raise UsageError(
            f"--wrapper {spec}: cannot import {name!r} ({e}); give a module path such as "
            "exercises.step4_buckets, run from the repository root"
        ) from e
    if attr:
        if not hasattr(mod, attr):
            raise UsageError(f"--wrapper {spec}: {name} has no {attr!r}")
        found = getattr(mod, attr)
    else:
        classes = _defined_in(mod, nn.Module)
        if len(classes) > 1:
            names = ", ".join(c.__name__ for c in classes)
            raise UsageError(f"--wrapper {spec}: {name} defines several modules ({names}): name one, {name}:NAME")
        found = classes[0] if classes else getattr(mod, "sync_gradients", None)
        if found is None:
            raise UsageError(f"--wrapper {spec}: {name} defines no nn.Module wrapper and no sync_gradients")
    if "raise NotImplementedError" in inspect.getsource(found):
        raise UsageError(
            f"--wrapper {spec}: {found.__name__} still raises NotImplementedError: finish the exercise first "
            f"(python -m exercises {name.rsplit('.', 1)[-1]} runs its tests)"
        )
    if inspect.isclass(found):
        return found
    return lambda module: AfterBackward(module, found)


def wrap_with(spec: str, model: nn.Module) -> nn.Module:
    """`model` wrapped in the wrapper `spec` names (see `load`); rank 0 says whose code it is."""
    wrapped = load(spec)(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(
            f"--wrapper {spec}: gradients averaged by {type(wrapped).__name__}, your code, not ddp_from_scratch's DDP",
            flush=True,
        )
    return wrapped
