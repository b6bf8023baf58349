"""Which data parallelism a run uses, and whose: the one table of what each stage swaps in.

The training loop (train.py) and the optimizer step (step.py) are the same for every stage;
only the wrapper, the optimizer and the way to read and set the whole state differ:

    --parallel  --impl scratch (ddp_from_scratch/)               --impl native (torch's)
    ddp         our DDP + AdamW                                   torch's DDP + AdamW
    zero1       our DDP + zero.ZeroRedundancyOptimizer(AdamW)     torch's DDP + its ZeroRedundancyOptimizer(AdamW)
    zero2       no wrapper + zero2.Zero2Optimizer(AdamW)          none: torch has no separate ZeRO-2 (a usage error)
    fsdp        fsdp.FullyShardedDataParallel + AdamW on shards   fully_shard per layer, then the root (FSDP2) + AdamW
    (--ddp none: one process, no wrapper, AdamW)

`--ddp native|scratch` is `--parallel ddp --impl native|scratch` (train_args.py). Every stage gets the
same two parameter groups (weight decay on matrices, none on biases and LayerNorms). Our FSDP's flat
shards mix both kinds in one tensor, so its AdamW has weight decay 0 and `ShardDecay` applies AdamW's
decoupled decay `p *= 1 - lr * wd` to the matrix elements of each shard just before the step: the
operation AdamW does first, on the same elements, so the numbers are the same.

Gradient accumulation (--grad-accum-steps k): DDP and ZeRO-1 accumulate under `no_sync` and reduce once;
ZeRO-2 and FSDP (ours and torch's) reduce-scatter every micro-batch and add up the averaged shards:
the same gradient (rounded in another order), k reduce-scatters per step instead of one.

Checkpoints and snapshots hold the *whole* state in the format one process would write
(`full_model_state`, `full_optimizer_state`: collectives, every rank calls them; rank 0 writes),
so the server loads a sharded run's checkpoint unchanged and a snapshot of any stage resumes any
other (snapshot.py says why consolidated rather than per-rank shards).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DistributedSampler

from . import own_wrapper
from .distributed import DistEnv
from .train_args import TrainConfig

STAGES = ("ddp", "zero1", "zero2", "fsdp")


@dataclass
class ShardDecay:
    """AdamW's decoupled weight decay on the decayed elements of flat shards (our FSDP).

    Attributes:
        ranges: (shard, start, end): elements [start, end) of `shard` belong to a decayed parameter.
        weight_decay: the decay coefficient (--weight-decay).

    Registered with `optimizer.register_step_pre_hook`: before every `step()` it reads the learning
    rate that step uses and does `p.mul_(1 - lr * wd)`, as torch's AdamW does before its update.
    """

    ranges: list[tuple[nn.Parameter, int, int]]
    weight_decay: float

    @torch.no_grad()
    def __call__(self, opt, args, kwargs) -> None:
        factor = 1 - opt.param_groups[0]["lr"] * self.weight_decay
        for shard, start, end in self.ranges:
            shard[start:end].mul_(factor)


@dataclass
class Parallel:
    """One stage's model, optimizer and sampler, and how to read and set their whole state.

    Attributes:
        stage, impl: "none" / "ddp" / "zero1" / "zero2" / "fsdp"; "scratch" / "native" (None for none).
        model: what the loop calls (wrapped, or the model itself for zero2 and FSDP2).
        inner: the Hugging Face model inside (its config and save_pretrained for the checkpoint).
        opt: the optimizer (AdamW, or the sharded one wrapping it).
        make_sampler: dataset -> this rank's sampler.
        names: the parameters' names in the plain AdamW's index order (decay group, then the rest).
        n_decay: how many of `names` are in the decay group.
        weight_decay: the decay group's coefficient.
        comm_records: torch's DDP with --comm-hook and --report-to tensorboard: its compression hook's
            per-bucket times (comm_timing.timed_allreduce_hook), since that hook holds the one slot.
    """

    stage: str
    impl: str | None
    model: nn.Module
    inner: nn.Module
    opt: torch.optim.Optimizer
    make_sampler: Callable
    names: list[str]
    n_decay: int
    weight_decay: float
    hooks: list = field(default_factory=list)
    comm_records: list | None = None

    @property
    def label(self) -> str:
        """How the run names itself: none, native / scratch (DDP), or e.g. "fsdp scratch"."""
        return (self.impl or "none") if self.stage in ("none", "ddp") else f"{self.stage} {self.impl}"

    @property
    def sharded_forward(self) -> bool:
        """Every forward gathers parameters (FSDP): all ranks must run the same number of forwards."""
        return self.stage == "fsdp"

    @property
    def ddp_wrapped(self) -> bool:
        """A DDP wrapper whose bucket all-reduces can be recorded (comm_timing.py)."""
        return self.stage in ("ddp", "zero1") and self.impl is not None

    # ---- the whole state, as one process would hold it -----------------------------------
    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The unwrapped model's state dict, full-size CPU tensors. A collective for fsdp: call on every rank."""
        if self.stage == "fsdp" and self.impl == "scratch":
            return self.model.full_state_dict()
        if self.stage == "fsdp":
            from ddp_native.sharded import full_state_dict

            return full_state_dict(self.model)
        return {k: v.detach().cpu().clone() for k, v in self.inner.state_dict().items()}

    def full_optimizer_state(self) -> dict | None:
        """The optimizer state in plain AdamW's format (global indices in `names` order, the two
        groups) on rank 0, None elsewhere. A collective for every sharded stage: call on every rank."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        if self.stage in ("zero1", "zero2"):
            self.opt.consolidate_state_dict(to=0)
            return self.opt.state_dict() if rank == 0 else None
        if self.stage == "fsdp" and self.impl == "scratch":
            per_name = self.model.full_optim_state(self.opt)  # one all-gather per unit and moment
            hyper = {k: v for k, v in self.opt.param_groups[0].items() if k != "params"}
            groups = [
                {**hyper, "weight_decay": self.weight_decay, "params": list(range(self.n_decay))},
                {**hyper, "weight_decay": 0.0, "params": list(range(self.n_decay, len(self.names)))},
            ]
            state = {i: per_name[n] for i, n in enumerate(self.names) if n in per_name}
            return {"state": state, "param_groups": groups} if rank == 0 else None
        full = self.opt.state_dict()
        if self.stage == "fsdp":  # FSDP2: the moments are DTensors; gather each (same order on every rank)
            from torch.distributed.tensor import DTensor

            full["state"] = {
                i: {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone() for k, v in s.items()}
                for i, s in sorted(full["state"].items())
            }
        return full if rank == 0 else None

    def load_optimizer_state(self, state: dict) -> None:
        """Set the optimizer from `full_optimizer_state()`'s format, on every rank (each keeps its shard)."""
        if self.stage == "fsdp" and self.impl == "scratch":
            per_name = {self.names[i]: s for i, s in state["state"].items()}
            index = {id(s): k for k, s in enumerate(self.opt.param_groups[0]["params"])}  # by identity
            cut = self.model.shard_optim_state(per_name)
            hyper = {k: v for k, v in state["param_groups"][0].items() if k not in ("params", "weight_decay")}
            group = {**self.opt.param_groups[0], **hyper, "params": list(range(len(index)))}
            self.opt.load_state_dict({"state": {index[id(s)]: v for s, v in cut.items()}, "param_groups": [group]})
            return
        if self.stage == "fsdp":  # FSDP2: each rank keeps its slice of every moment (no communication)
            from torch.distributed.tensor import distribute_tensor

            params = [p for g in self.opt.param_groups for p in g["params"]]
            cut = {}
            for i, s in sorted(state["state"].items()):
                p = params[i]
                cut[i] = {
                    k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                    if torch.is_tensor(v) and v.dim() > 0
                    else v
                    for k, v in s.items()
                }
            state = {**state, "state": cut}
        self.opt.load_state_dict(state)

    def scheduler_state(self, sched) -> dict:
        """The schedule's state with one entry per *logical* group (the two of `names`): our FSDP's
        AdamW has one group (its shards), every other stage two; all share one rate."""
        s = sched.state_dict()
        return {**s, **{k: s[k][:1] * 2 for k in ("base_lrs", "_last_lr") if len(s.get(k) or ()) == 1}}

    def load_scheduler_state(self, sched, state: dict) -> None:
        """The inverse of `scheduler_state`, for this optimizer's number of groups."""
        n = len(self.opt.param_groups)
        sched.load_state_dict({**state, **{k: state[k][:n] for k in ("base_lrs", "_last_lr") if k in state}})


def _groups(named: list[tuple[str, nn.Parameter]], weight_decay: float):
    decay = [(n, p) for n, p in named if p.ndim > 1]
    rest = [(n, p) for n, p in named if p.ndim <= 1]
    groups = [
        {"params": [p for _, p in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in rest], "weight_decay": 0.0},
    ]
    return groups, [n for n, _ in decay + rest], len(decay)


def setup(model: nn.Module, config: TrainConfig, env: DistEnv) -> Parallel:
    """The stage `config.parallel` by `config.impl` around `model` (on `env.device`, every rank
    the same weights): wrapper, AdamW (lr `config.lr`, the two groups) and the sampler factory.

    `config` is resolved (train_args.TrainConfig.resolved); the combinations torch lacks were
    refused there (a usage error, exit 2), so nothing is raised here.
    """
    stage, impl = ("none", None) if config.ddp == "none" else (config.parallel, config.impl)
    groups, names, n_decay = _groups(list(model.named_parameters()), config.weight_decay)
    wd, lr = config.weight_decay, config.lr
    lib = None if impl is None else importlib.import_module("ddp_native" if impl == "native" else "ddp_from_scratch")
    if lib is None:
        sampler = lambda ds: DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=config.seed)  # noqa: E731
    else:
        sampler = lambda ds: lib.DistributedSampler(  # noqa: E731
            ds, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=config.seed
        )
    mine = {}
    if impl == "scratch":
        sparse = {"auto": "auto", "on": True, "off": False}[config.sparse_embeddings]
        mine = {"all_reduce": config.all_reduce, "sparse_embeddings": sparse}
    hooks: list = []
    if stage in ("none", "ddp"):
        if config.wrapper:  # the learner's own wrapper (docs/exercises.md) in place of ours: own_wrapper.py
            wrapped = own_wrapper.wrap_with(config.wrapper, model)
        else:
            wrapped = model if lib is None else lib.wrap(model, env.device, bucket_cap_mb=config.bucket_cap_mb, **mine)
        opt = torch.optim.AdamW(groups, lr=lr)
    elif stage == "zero1":  # a DDP (all-reduce) and a sharded optimizer (each rank steps its part, all-gather)
        wrapped = lib.wrap(model, env.device, bucket_cap_mb=config.bucket_cap_mb, **mine)
        if impl == "native":
            from torch.distributed.optim import ZeroRedundancyOptimizer

            opt = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=lr)
        else:
            from ddp_from_scratch.zero import ZeroRedundancyOptimizer

            opt = ZeroRedundancyOptimizer(groups, torch.optim.AdamW, collectives=config.all_reduce, lr=lr)
    elif stage == "zero2":  # no wrapper: the optimizer's gradient hooks do the reduce-scatters
        from ddp_from_scratch.zero2 import Zero2Optimizer

        wrapped = model
        cap = 25.0 if config.bucket_cap_mb is None else config.bucket_cap_mb
        opt = Zero2Optimizer(groups, torch.optim.AdamW, collectives=config.all_reduce, bucket_cap_mb=cap, lr=lr)
    elif impl == "native":  # fsdp: FSDP2 swaps the parameters for sharded DTensors in place
        from ddp_native.sharded import fsdp

        wrapped = fsdp(model)
        groups, names, n_decay = _groups(list(wrapped.named_parameters()), wd)
        opt = torch.optim.AdamW(groups, lr=lr)
    else:
        from ddp_from_scratch.fsdp import FullyShardedDataParallel

        decayed = {id(p) for p in groups[0]["params"]}
        wrapped = FullyShardedDataParallel(model, collectives=config.all_reduce)
        opt = torch.optim.AdamW(wrapped.parameters(), lr=lr, weight_decay=0.0)
        hooks.append(opt.register_step_pre_hook(ShardDecay(_decayed_ranges(wrapped, decayed), wd)))
    comm_records = None
    if config.comm_hook != "none":  # ddp or zero1 (train_args refuses the rest): every bucket in 16 bits
        hook = compress_hook(impl, config.comm_hook)
        if impl == "native" and config.report_to == "tensorboard":  # torch's one hook slot: time inside it
            from .comm_timing import timed_allreduce_hook

            comm_records = []
            hook = timed_allreduce_hook(comm_records, inner=hook)
        wrapped.register_comm_hook(None, hook)
    return Parallel(stage, impl, wrapped, model, opt, sampler, names, n_decay, wd, hooks, comm_records)


def compress_hook(impl: str, kind: str):
    """The fp16 / bf16 compression hook for `impl`'s DDP: torch's (ddp_native.compress_hook) or ours
    (ddp_from_scratch/comm_hooks.py), the same arithmetic, so the two stay bit-identical on 2 ranks."""
    if impl == "native":
        from ddp_native import compress_hook as torch_hook

        return torch_hook(kind)
    from ddp_from_scratch import comm_hooks

    return getattr(comm_hooks, f"{kind}_compress_hook")


def _decayed_ranges(fsdp, decayed: set[int]) -> list[tuple[nn.Parameter, int, int]]:
    """Where the decayed parameters lie in this rank's shards: (shard, start, end), shard-local."""
    out = []
    for unit in fsdp.units:
        flat = unit.flat
        if flat is None:
            continue
        size = flat.shard.numel()
        lo = flat.comm.rank * size
        for p, offset, numel in zip(fsdp.unit_parameters(unit), flat.offsets, flat.numels):
            a, b = max(offset, lo), min(offset + numel, lo + size)
            if id(p) in decayed and a < b:
                out.append((flat.shard, a - lo, b - lo))
    return out
