"""ZeRO stage 2: gradients sharded too, by a reduce-scatter of each bucket instead of an all-reduce.

ZeRO-1 (zero.py) still all-reduces every gradient to every rank, although each rank then
uses only its shard. ZeRO-2 (Rajbhandari et al., SC 2020 §5.2, P_os+g) sends each rank only
the part it steps: a bucket's reduce-scatter leaves chunk r averaged on rank r, in half the
bytes of an all-reduce, and nothing else of the gradient is kept:

    backward: gradients -> buckets (bucket.py's assignment: reverse order, byte caps), each
              param.grad dropped once copied in; a full bucket launches its reduce-scatter
              while backward goes on (as reducer.py launches its all-reduce); rank r keeps
              chunk r of each bucket: 4 Psi / n gradient bytes instead of 4 Psi
    step:     the optimizer steps rank r's chunk of each bucket's flat parameters (fp32
              master copy, with its state: 8 Psi / n for AdamW), then an all-gather per bucket
              gives every rank all updated parameters (the other half of an all-reduce)

Communication per step: reduce-scatter + all-gather = 2 (n-1)/n Psi, what DDP's all-reduce
costs. The chunks cut through parameters (flat_param.py says why that is fine for elementwise
optimizers: SGD, Adam, AdamW; not for per-parameter rules such as LAMB: use zero.py there).

This is an optimizer, not a model wrapper (DeepSpeed's ZeRO-2 is too): it registers its own
gradient hooks, so the model is *not* wrapped in a DDP, whose all-reduce would do the work twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd import Variable

from . import collectives, debug
from .bucket import MB, assign_buckets
from .flat_param import ShardComm, clip_grad_norm_
from .replicas import broadcast_from, held_weakly
from .zero import ShardedOptimizer, hyperparameters, load_hyperparameters


@dataclass
class ShardedBucket:
    """One bucket: a flat gradient (during backward only) and rank r's chunk of its flat parameters.

    Attributes:
        index: launch order, the same on every rank.
        params: the members, in bucket order; `offsets`/`numels` place them in the flat tensor.
        numel_padded: flat length (a multiple of n for torch's equal-chunk collectives).
        flat: the members' weights, back to back: each member's `.data` is a view of it.
        shard: `nn.Parameter` viewing rank r's chunk of `flat`: the tensor the optimizer steps.
        grad: the flat gradient being filled (None outside backward); pending: members still to come.
        future: its reduce-scatter in flight.
    """

    index: int
    params: list[torch.Tensor]
    offsets: list[int]
    numels: list[int]
    numel_padded: int
    flat: torch.Tensor
    shard: torch.nn.Parameter
    grad: torch.Tensor | None = None
    pending: int = 0
    future: object = None
    start: float = 0.0  # launch time (wall seconds), for the debug line
    timer: debug.CollectiveTimer | None = None  # the reduce-scatter's, in stream order (debug lines only)
    slots: dict = field(default_factory=dict)  # id(param) -> position in `params`


class Zero2Optimizer(ShardedOptimizer):
    """ZeRO-2: `optimizer_class(**defaults)` on this rank's chunk of every gradient bucket.

    Args:
        params: parameters or groups (every rank the same, in the same order: `model.parameters()`).
        optimizer_class: an elementwise optimizer, e.g. `torch.optim.AdamW`.
        process_group: None = the default group.
        collectives: "torch" (`dist.reduce_scatter_tensor`, `dist.all_gather_single`) or "ring" (ours).
        bucket_cap_mb: cap of every bucket in MiB (bucket.py; 25 as DDP's).
        **defaults: the optimizer's keyword arguments.

    At construction rank 0's parameters are broadcast (as a DDP wrapper would) and each
    bucket's parameters are moved into one flat tensor (`param.data` is re-pointed to a view of
    it, as DDP's gradient_as_bucket_view re-points `.grad`); the optimizer steps a view of chunk
    r of it, so there is no second copy of the weights. Gradients are averaged as reducer.py
    does (each multiplied by 1/n while copied into its bucket, then a SUM reduce-scatter), so
    with our ring the numbers are those of our DDP with the same buckets. With "ring" the flat
    tensors are not padded (the ring cuts with `tensor_split`, as in DDP's all-reduce); torch's
    collectives need equal chunks, so there each flat tensor is padded to a multiple of n.

    `param_groups` holds the model's parameters (for LR schedulers); `zero_grad()` clears the
    chunks' gradients too. Gradient accumulation over several backwards works (the averaged
    chunks add up) but reduce-scatters every backward. `consolidate_state_dict`/`state_dict`/
    `load_state_dict` speak torch.optim's format for the model's parameters, like zero.py's.

    Raises: RuntimeError (no process group); ValueError (unknown collectives).
    """

    def __init__(
        self,
        params,
        optimizer_class,
        process_group=None,
        collectives: str = "torch",
        bucket_cap_mb: float = 25.0,
        **defaults,
    ):
        super().__init__(params, defaults)
        self.comm = ShardComm(process_group, collectives)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        everything = [p for g in self.param_groups for p in g["params"]]
        broadcast_from([p.data for p in everything], 0, process_group)
        self.buckets: list[ShardedBucket] = []
        local_groups = []
        for group in self.param_groups:
            trainable = [p for p in group["params"] if p.requires_grad]
            order = list(reversed(range(len(trainable))))  # gradients come in reverse order (bucket.py)
            first = len(self.buckets)
            for members in assign_buckets(trainable, order, [int(bucket_cap_mb * MB)]):
                self.buckets.append(self._make_bucket(len(self.buckets), [trainable[i] for i in members]))
            shards = [b.shard for b in self.buckets[first:]]
            local_groups.append(hyperparameters(group) | {"params": shards})
        self._local_optimizer(optimizer_class, local_groups, defaults)
        self._where = {id(p): b for b in self.buckets for p in b.params}
        self._next_bucket, self._callback_queued = 0, False
        self._hooks = [  # weakly: see held_weakly
            p.register_post_accumulate_grad_hook(held_weakly(self._grad_hook)) for p in everything if p.requires_grad
        ]

    def _make_bucket(self, index: int, params: list[torch.Tensor]) -> ShardedBucket:
        """Move `params` into one flat tensor (each becomes a view of it) and take chunk r of it as the shard."""
        numels = [p.numel() for p in params]
        n, total = self.world_size, sum(numels)
        padded = -(-total // n) * n if self.comm.algorithm == "torch" else total
        flat = torch.zeros(padded, dtype=params[0].dtype, device=params[0].device)
        offsets = [sum(numels[:i]) for i in range(len(params))]
        for p, o, k in zip(params, offsets, numels):
            flat[o : o + k].copy_(p.detach().reshape(-1))
            p.data = flat[o : o + k].view_as(p)  # no second copy of the weights: the step writes them in place
        shard = torch.nn.Parameter(flat.tensor_split(n)[self.rank])  # a view too: stepping it updates the model
        slots = {id(p): i for i, p in enumerate(params)}
        return ShardedBucket(index, params, offsets, numels, padded, flat, shard, pending=len(params), slots=slots)

    # ---- backward: called by autograd -------------------------------------------------
    @torch.no_grad()
    def _grad_hook(self, p: torch.Tensor) -> None:
        if not self._callback_queued:
            Variable._execution_engine.queue_callback(self._finalize_backward)
            self._callback_queued = True
        b = self._where[id(p)]
        self._fill(b, b.slots[id(p)], p.grad)
        p.grad = None  # the full-size gradient is not kept: that is the saving
        b.pending -= 1
        while self._next_bucket < len(self.buckets) and self.buckets[self._next_bucket].pending == 0:
            self._reduce_scatter_bucket(self.buckets[self._next_bucket])
            self._next_bucket += 1

    def _fill(self, b: ShardedBucket, i: int, grad: torch.Tensor | None) -> None:
        if b.grad is None:
            b.grad = torch.zeros(b.numel_padded, dtype=b.shard.dtype, device=b.shard.device)
        if grad is not None:  # pre-divided, as reducer.py does: the same numbers as our DDP
            torch.mul(grad.reshape(-1), 1.0 / self.world_size, out=b.grad[b.offsets[i] : b.offsets[i] + b.numels[i]])

    def _reduce_scatter_bucket(self, b: ShardedBucket) -> None:
        b.start = debug.now()
        b.timer = debug.CollectiveTimer(b.grad.device) if self.debug else None
        b.future = self.comm.reduce_scatter(b.grad, op=collectives.SUM)
        b.grad = None  # the collective holds it until done; then its memory goes

    def _finalize_backward(self) -> None:
        """End of backward: launch buckets left incomplete (unused parameters count as zeros), wait, keep chunks."""
        self._callback_queued = False
        for b in self.buckets[self._next_bucket :]:
            if b.grad is None:
                b.grad = torch.zeros(b.numel_padded, dtype=b.shard.dtype, device=b.shard.device)
            self._reduce_scatter_bucket(b)
        for b in self.buckets:
            chunk = b.future.wait()
            if b.timer is not None:  # logged when waited for: gloo's reduce-scatter has no future to watch
                b.timer.stop()  # on the stream that waited: the reduce-scatter's end in stream order (CUDA)
                nbytes = b.numel_padded * b.shard.element_size()
                op = f"reduce_scatter/{self.comm.algorithm}(zero-2)"
                debug.log_timed(b.timer, self.rank, op, b.index, nbytes, self.comm.peers, b.start)
                b.timer = None
            b.shard.grad = chunk if b.shard.grad is None else b.shard.grad.add_(chunk)
            b.future, b.pending = None, len(b.params)
        self._next_bucket = 0

    # ---- the step (ShardedOptimizer.step: this rank's chunks, then this) ----------------
    @torch.no_grad()
    def sync_parameters(self) -> None:
        """All-gather each bucket's parameters: every rank's weights current again."""
        for b in self.buckets:  # chunk r of each flat is already updated (the shard is a view of it)
            start, flat = debug.now(), b.flat
            timer = debug.CollectiveTimer(flat.device) if self.debug else None
            self.comm.all_gather(flat).wait()  # in place: the model's weights, views of `flat`, are now current
            if timer is not None:
                timer.stop()
                op = f"all_gather/{self.comm.algorithm}(zero-2 params)"
                nbytes = flat.numel() * flat.element_size()
                debug.log_timed(timer, self.rank, op, b.index, nbytes, self.comm.peers, start)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the sharded gradients by their global 2-norm, as `torch.nn.utils.clip_grad_norm_`
        over the model would unsharded (flat_param.clip_grad_norm_). Every rank calls it, after
        backward and before `step()`."""
        return clip_grad_norm_([b.shard for b in self.buckets], max_norm, self.comm.process_group)

    # ---- checkpoints ------------------------------------------------------------------
    @torch.no_grad()
    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather the optimizer state on rank `to` (of the group), per parameter; call on every rank.

        Each state tensor of a chunk's shape (Adam's moments) is all-gathered per bucket and cut
        back into the parameters' shapes; scalars (`step`) are the same on every rank and copied.
        Cost: one all-gather per bucket and state tensor (AdamW: 8 Psi bytes in all).
        """
        state: dict[int, dict] = {}
        for b in self.buckets:
            mine = self.optim.state.get(b.shard, {})
            for key, value in sorted(mine.items()):
                if torch.is_tensor(value) and value.shape == b.shard.shape:
                    flat = torch.zeros(b.numel_padded, dtype=value.dtype, device=value.device)
                    flat.tensor_split(self.world_size)[self.rank].copy_(value)
                    self.comm.all_gather(flat).wait()
                    per_param = [flat[o : o + k].view_as(p) for p, o, k in zip(b.params, b.offsets, b.numels)]
                else:
                    per_param = [value] * len(b.params)
                for p, v in zip(b.params, per_param):
                    v = v.detach().cpu().clone() if torch.is_tensor(v) else v
                    state.setdefault(self.index[p], {})[key] = v
        self._consolidated = state if self.rank == to else None

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a full state dict (this class's, zero.py's or a plain optimizer's) on every rank:
        each keeps the chunks of its buckets. No communication.

        Raises: ValueError if the parameter groups do not match in number or size.
        """
        load_hyperparameters(self.param_groups, state_dict["param_groups"])
        shard_index = {id(b.shard): k for k, b in enumerate(self.buckets)}
        local_state = {}
        for b in self.buckets:
            per_param = [state_dict["state"].get(self.index[p]) for p in b.params]
            if any(s is None for s in per_param):
                continue  # no state yet for this bucket (never stepped)
            entry = {}
            for key, value in per_param[0].items():
                if torch.is_tensor(value) and value.shape == b.params[0].shape and value.dim() > 0:
                    flat = torch.zeros(b.numel_padded, dtype=value.dtype, device=b.shard.device)
                    for s, o, k in zip(per_param, b.offsets, b.numels):
                        flat[o : o + k].copy_(s[key].reshape(-1))
                    entry[key] = flat.tensor_split(self.world_size)[self.rank].clone()
                else:
                    entry[key] = value
            local_state[shard_index[id(b.shard)]] = entry
        groups = [
            {**hyperparameters(full), "params": [shard_index[id(s)] for s in mine["params"]]}
            for full, mine in zip(self.param_groups, self.optim.param_groups)
        ]
        self.optim.load_state_dict({"state": local_state, "param_groups": groups})

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the model's gradients (None between steps anyway) and the chunks' averaged gradients."""
        super().zero_grad(set_to_none)
        self.optim.zero_grad(set_to_none)
