"""Which data parallelism a run uses, and whose: the one table (`STRATEGIES`) of what each stage swaps in.

The training loop (train.py) and the optimizer step (step.py) are the same for every stage;
only the wrapper, the optimizer and the way to read and set the whole state differ:

    --parallel  --impl scratch (ddp_from_scratch/)               --impl native (torch's)
    ddp         our DDP + AdamW                                   torch's DDP + AdamW
    zero1       our DDP + zero.ZeroRedundancyOptimizer(AdamW)     torch's DDP + its ZeroRedundancyOptimizer(AdamW)
    zero2       no wrapper + zero2.Zero2Optimizer(AdamW)          none: torch has no separate ZeRO-2 (a usage error)
    fsdp        fsdp.FullyShardedDataParallel + AdamW on shards   fully_shard per layer, then the root (FSDP2) + AdamW
    (--ddp none: one process, no wrapper, AdamW)

Each row is a `Strategy` keyed by (stage, implementation): how to wrap a model and build its optimizer,
how to read and set the whole state (full_state.py), what it supports (precisions, a DDP comm hook, the torch
features it needs) and its names. Training's checks (train_args.py), compare, the benchmarks (the DDP
wrappers, the memory benchmark) and the GPU check look a stage up here and never test its name: adding a
stage is one `register(Strategy(...))` (tests/harness/test_strategy_registry.py registers a dummy one).
The idea is torch's own: `torch.distributed.Backend.register_backend`, DDP's `DDPCommHookType` table.

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
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .full_state import DTensorShards, OurShards, Replicated, ShardedGradients, ShardedOptimizer

if TYPE_CHECKING:
    from .distributed import DistEnv
    from .train_args import TrainConfig

PRECISIONS = ("fp32", "fp16", "bf16")
UNSCALED = ("fp32", "bf16")  # a stage whose ranks hold only gradient shards: no fp16 loss scaler (see FP16_SHARDED)
FP16_SHARDED = (
    "each rank holds only its shard of the gradients, so the loss scaler's inf/NaN check would differ between"
    " ranks (torch needs its ShardedGradScaler); use --precision bf16 (no scaler) or --parallel ddp|zero1"
)


@dataclass(frozen=True)
class Options:
    """How a stage is built: training's options (`of(config)`), or a benchmark's own choice.

    Attributes:
        lr, weight_decay: AdamW's (two groups: decay on matrices, none on biases and LayerNorms).
        bucket_cap_mb: DDP's bucket cap in MiB (None: torch's 25 with a 1 MiB first bucket); ZeRO-2's too (25).
        all_reduce: ours' collectives, "torch" (torch.distributed's) or "ring" (ddp_from_scratch/collectives.py).
        sparse_embeddings: our DDP's option of that name ("auto", True, False).
        gradient_as_bucket_view: both DDPs' option: gradients are views of the buckets (the memory benchmark).
        python_allreduce: torch's DDP all-reduces through its Python `allreduce_hook`, so that a counter of
            `torch.distributed` calls sees them (the memory benchmark; the same arithmetic as its C++ path).
        wrapper: a learner's own DDP wrapper in place of ours (`--wrapper MODULE`, experiments/own_wrapper.py).
    """

    lr: float = 5e-5
    weight_decay: float = 0.01
    bucket_cap_mb: float | None = None
    all_reduce: str = "torch"
    sparse_embeddings: str | bool = "auto"
    gradient_as_bucket_view: bool = False
    python_allreduce: bool = False
    wrapper: str | None = None

    @classmethod
    def of(cls, config: TrainConfig) -> Options:
        """The options of a training run (`config`: a resolved TrainConfig)."""
        sparse = {"auto": "auto", "on": True, "off": False}[config.sparse_embeddings]
        return cls(
            config.lr, config.weight_decay, config.bucket_cap_mb, config.all_reduce, sparse, wrapper=config.wrapper
        )


# ---- whose: the two implementations -----------------------------------------------------------
def _our_ddp(model: nn.Module, o: Options, device: torch.device) -> nn.Module:
    if o.wrapper:  # the learner's own wrapper (docs/exercises.md) takes our DDP's place: own_wrapper.py
        from . import own_wrapper

        return own_wrapper.wrap_with(o.wrapper, model)
    import ddp_from_scratch

    view = {"gradient_as_bucket_view": True} if o.gradient_as_bucket_view else {}
    return ddp_from_scratch.wrap(
        model,
        device,
        bucket_cap_mb=o.bucket_cap_mb,
        all_reduce=o.all_reduce,
        sparse_embeddings=o.sparse_embeddings,
        **view,
    )


def _torch_ddp(model: nn.Module, o: Options, device: torch.device) -> nn.Module:
    import ddp_native

    view = {"gradient_as_bucket_view": True} if o.gradient_as_bucket_view else {}
    wrapped = ddp_native.wrap(model, device, bucket_cap_mb=o.bucket_cap_mb, **view)
    if o.python_allreduce:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        wrapped.register_comm_hook(None, default_hooks.allreduce_hook)
    return wrapped


def _our_compress_hook(kind: str):
    from ddp_from_scratch import comm_hooks

    return getattr(comm_hooks, f"{kind}_compress_hook")


def _torch_compress_hook(kind: str):
    from ddp_native import compress_hook

    return compress_hook(kind)


@dataclass(frozen=True)
class Implementation:
    """Whose code a stage runs: ours (ddp_from_scratch/) or torch's (ddp_native/).

    Attributes:
        name: the command line's --impl value; whose: how tables name it ("ours", "torch").
        library: the module with its `DistributedSampler`.
        native: torch's own (its DDP keeps no bucket timeline of its own: comm_timing.py hooks it).
        ddp: (model, Options, device) -> its DDP around `model`.
        compress_hook: "fp16" / "bf16" -> its compression hook (the same arithmetic in both, bit-identical on 2 ranks).
    """

    name: str
    whose: str
    library: str
    native: bool
    ddp: Callable[[nn.Module, Options, torch.device], nn.Module]
    compress_hook: Callable[[str], Callable]

    def sampler_class(self):
        return importlib.import_module(self.library).DistributedSampler


OURS = Implementation("scratch", "ours", "ddp_from_scratch", False, _our_ddp, _our_compress_hook)
TORCHS = Implementation("native", "torch", "ddp_native", True, _torch_ddp, _torch_compress_hook)
IMPLEMENTATIONS = {i.name: i for i in (OURS, TORCHS)}


# ---- the optimizers -----------------------------------------------------------------------------
Groups = tuple[list[dict], list[str], int]  # AdamW's two groups, the parameters' names in index order, how many decay


def _groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> Groups:
    decay = [(n, p) for n, p in named if p.ndim > 1]
    rest = [(n, p) for n, p in named if p.ndim <= 1]
    groups = [
        {"params": [p for _, p in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in rest], "weight_decay": 0.0},
    ]
    return groups, [n for n, _ in decay + rest], len(decay)


def adamw(wrapped: nn.Module, groups: Groups, o: Options):
    """AdamW on the two groups: (optimizer, groups, step pre-hooks)."""
    return torch.optim.AdamW(groups[0], lr=o.lr), groups, []


def our_zero1(wrapped: nn.Module, groups: Groups, o: Options):
    from ddp_from_scratch.zero import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(groups[0], torch.optim.AdamW, collectives=o.all_reduce, lr=o.lr), groups, []


def torch_zero1(wrapped: nn.Module, groups: Groups, o: Options):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(groups[0], optimizer_class=torch.optim.AdamW, lr=o.lr), groups, []


def our_zero2(wrapped: nn.Module, groups: Groups, o: Options):
    from ddp_from_scratch.zero2 import Zero2Optimizer

    cap = 25.0 if o.bucket_cap_mb is None else o.bucket_cap_mb
    opt = Zero2Optimizer(groups[0], torch.optim.AdamW, collectives=o.all_reduce, bucket_cap_mb=cap, lr=o.lr)
    return opt, groups, []


def fsdp2_adamw(wrapped: nn.Module, groups: Groups, o: Options):
    """AdamW on the DTensor parameters FSDP2 swapped in (the groups made again from them)."""
    return adamw(wrapped, _groups(list(wrapped.named_parameters()), o.weight_decay), o)


def our_fsdp_adamw(wrapped: nn.Module, groups: Groups, o: Options):
    """AdamW without decay on the flat shards, and ShardDecay before each step on the decayed elements."""
    decayed = {id(p) for p in groups[0][0]["params"]}
    opt = torch.optim.AdamW(wrapped.parameters(), lr=o.lr, weight_decay=0.0)
    return opt, groups, [opt.register_step_pre_hook(ShardDecay(_decayed_ranges(wrapped, decayed), o.weight_decay))]


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


# ---- the wrappers -------------------------------------------------------------------------------
def no_wrapper(model: nn.Module, o: Options, device: torch.device, impl: Implementation) -> nn.Module:
    """ZeRO-2: the optimizer's gradient hooks do the reduce-scatters; the loop calls the model itself."""
    return model


def ddp_wrapper(model: nn.Module, o: Options, device: torch.device, impl: Implementation) -> nn.Module:
    return impl.ddp(model, o, device)


def our_fsdp(model: nn.Module, o: Options, device: torch.device, impl: Implementation) -> nn.Module:
    from ddp_from_scratch.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model, collectives=o.all_reduce)


def torch_fsdp(model: nn.Module, o: Options, device: torch.device, impl: Implementation) -> nn.Module:
    """FSDP2 on our FSDP's units (each transformer layer), then the root: the two shard alike."""
    from ddp_from_scratch.fsdp import default_units
    from ddp_native.sharded import fsdp

    return fsdp(model, default_units(model))


# ---- the table --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Strategy:
    """One (stage, implementation): how it wraps, optimizes, reads and sets the whole state, what it supports.

    Attributes:
        stage: --parallel's value ("ddp", "zero1", ...); title: how tables name it ("ZeRO-1").
        impl: whose code (`Implementation`: --impl's value, e.g. OURS).
        wrap: (model, Options, device, impl) -> what the loop calls (`no_wrapper`: the model itself).
        optimizer: (wrapped, Groups, Options) -> (optimizer, Groups in its index order, step pre-hooks).
        state: how the whole state is read and set (full_state.py's `Replicated`, ...), and what a rank holds.
        precisions: the --precision values it takes; `refused` says why the others are not.
        comm_hook: a DDP's bucket all-reduce: --comm-hook compresses it and comm_timing.py records it.
        sharded_forward: every forward gathers parameters (FSDP): all ranks must run as many forwards.
        needs: torch features (experiments/features.py), refused by feature where this torch lacks one.
        shards: which of "params", "grads", "optim" each rank holds 1/n of (the ZeRO paper's formula, §5).
        sent: bytes each rank sends per step, in units of (n-1)/n 4 Psi (fp32, ring algorithms).
    """

    stage: str
    impl: Implementation
    title: str
    wrap: Callable
    optimizer: Callable
    state: Replicated
    precisions: tuple[str, ...] = PRECISIONS
    refused: str = ""
    comm_hook: bool = False
    sharded_forward: bool = False
    needs: tuple[str, ...] = ()
    shards: frozenset = frozenset()
    sent: float = 2

    @property
    def key(self) -> tuple[str, str]:
        return (self.stage, self.impl.name)

    @property
    def label(self) -> str:
        """How a run names itself: the implementation for DDP ("native", "scratch"), else e.g. "fsdp scratch"."""
        return self.impl.name if self.stage == DDP else f"{self.stage} {self.impl.name}"

    @property
    def short_name(self) -> str:
        """The GPU check's name: DDP by its implementation ("native", "scratch"), another stage alone for ours
        (the default: "fsdp"), with its implementation for torch's ("fsdp-native")."""
        if self.stage == DDP:
            return self.impl.name
        return self.stage if self.impl.name == DEFAULT_IMPL else f"{self.stage}-{self.impl.name}"

    @property
    def run_name(self) -> str:
        """A run's folder (runs/<run_name>-np<N>, compare's <out>/<run_name>) and the GPU check's training name."""
        return self.label.replace(" ", "-")

    def flags(self) -> list[str]:
        """experiments.train's options for this stage (DDP keeps its documented `--ddp IMPL` shorthand)."""
        return ["--ddp", self.impl.name] if self.stage == DDP else ["--parallel", self.stage, "--impl", self.impl.name]

    def predicted(self, psi: int, n: int) -> dict[str, float]:
        """The ZeRO paper's bytes per rank for fp32 AdamW (4 + 4 + 8 per parameter), sharded terms / n."""
        full = {"params": 4 * psi, "grads": 4 * psi, "optim": 8 * psi}
        return {k: b / n if k in self.shards else b for k, b in full.items()}

    def predicted_sent(self, psi: int, n: int) -> float:
        return self.sent * (n - 1) / n * 4 * psi

    def build(self, model: nn.Module, o: Options, device: torch.device) -> tuple[nn.Module, object, Groups, list]:
        """(what the loop calls, optimizer, Groups, step pre-hooks) for `model` (on `device`, alike on every rank)."""
        groups = _groups(list(model.named_parameters()), o.weight_decay)  # before wrapping: the model's own names
        wrapped = self.wrap(model, o, device, self.impl)
        opt, groups, hooks = self.optimizer(wrapped, groups, o)
        return wrapped, opt, groups, hooks


DDP = "ddp"  # the stage `--ddp native|scratch` names, and the reference of every table ("vs DDP")
DEFAULT_IMPL = OURS.name
STRATEGIES: dict[tuple[str, str], Strategy] = {}
MISSING = {  # combinations that do not exist, and why: said wherever one is asked for
    ("zero2", "native"): "torch has no separate ZeRO-2 (its FSDP2 shards the parameters too;"
    " its nearest, fully_shard(reshard_after_forward=False))",
}


def run_name(strategy: Strategy | None) -> str:
    """The name of a run of `strategy` (None: one process, "none"): its folder, its row in compare's table."""
    return "none" if strategy is None else strategy.run_name


def register(strategy: Strategy) -> Strategy:
    """Add `strategy` to the table (training, compare, the benchmarks and the GPU check then offer it)."""
    STRATEGIES[strategy.key] = strategy
    return strategy


def unregister(key: tuple[str, str]) -> None:
    STRATEGIES.pop(key, None)


def lookup(stage: str, impl: str) -> Strategy | None:
    """The strategy of `stage` by `impl`, or None where that combination does not exist."""
    return STRATEGIES.get((stage, impl))


def stages() -> list[str]:
    return list(dict.fromkeys(s.stage for s in STRATEGIES.values()))


def impls_of(stage: str) -> list[str]:
    return [s.impl.name for s in STRATEGIES.values() if s.stage == stage]


def reference() -> Strategy:
    """What tables compare against ("vs DDP"): our DDP."""
    return STRATEGIES[(DDP, OURS.name)]


def combinations() -> str:
    """The combinations that exist, in words (error messages): "--parallel ddp, zero1 or fsdp with --impl
    scratch or native; --parallel zero2 with --impl scratch; --ddp none (one process)"."""
    by_impls: dict[tuple[str, ...], list[str]] = {}
    for stage in stages():
        by_impls.setdefault(tuple(impls_of(stage)), []).append(stage)
    either = lambda xs: ", ".join(xs[:-1]) + f" or {xs[-1]}" if len(xs) > 1 else xs[0]  # noqa: E731
    rows = [f"--parallel {either(s)} with --impl {either(list(i))}" for i, s in by_impls.items()]
    return "; ".join([*rows, "--ddp none (one process)"])


def missing_note(stage: str, impl: str) -> str:
    """Why (stage, impl) is not in the table, with the combinations that are."""
    why = MISSING.get((stage, impl), "not in experiments/parallel.py's table")
    return f"--parallel {stage} --impl {impl} does not exist: {why}. The combinations that exist: {combinations()}"


ZERO1 = dict(comm_hook=True, shards=frozenset({"optim"}), sent=3)  # DDP's all-reduce, then the parameters gathered
ZERO2 = dict(precisions=UNSCALED, refused=FP16_SHARDED, shards=frozenset({"optim", "grads"}))
FSDP = dict(ZERO2, sharded_forward=True, shards=frozenset({"optim", "grads", "params"}), sent=3)
for _s in (
    Strategy(DDP, OURS, "DDP", ddp_wrapper, adamw, Replicated(), comm_hook=True),
    Strategy(DDP, TORCHS, "DDP", ddp_wrapper, adamw, Replicated(), comm_hook=True),
    Strategy("zero1", OURS, "ZeRO-1", ddp_wrapper, our_zero1, ShardedOptimizer(), **ZERO1),
    Strategy("zero1", TORCHS, "ZeRO-1", ddp_wrapper, torch_zero1, ShardedOptimizer(), **ZERO1),
    Strategy("zero2", OURS, "ZeRO-2", no_wrapper, our_zero2, ShardedGradients(), **ZERO2),
    Strategy("fsdp", OURS, "FSDP (ZeRO-3)", our_fsdp, our_fsdp_adamw, OurShards(), **FSDP),
    Strategy("fsdp", TORCHS, "FSDP (ZeRO-3)", torch_fsdp, fsdp2_adamw, DTensorShards(), **FSDP, needs=("fsdp2",)),
):
    register(_s)


# ---- a run's stage --------------------------------------------------------------------------------
@dataclass
class Parallel:
    """One run's model, optimizer and sampler, and how to read and set their whole state.

    Attributes:
        strategy: the table's entry (None: one process, no wrapper).
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

    strategy: Strategy | None
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
    def rules(self) -> Replicated:
        return Replicated() if self.strategy is None else self.strategy.state

    @property
    def label(self) -> str:
        """How the run names itself: none, native / scratch (DDP), or e.g. "fsdp scratch"."""
        return "none" if self.strategy is None else self.strategy.label

    @property
    def sharded_forward(self) -> bool:
        """Every forward gathers parameters (FSDP): all ranks must run the same number of forwards."""
        return self.strategy is not None and self.strategy.sharded_forward

    @property
    def ddp_wrapped(self) -> bool:
        """A DDP wrapper whose bucket all-reduces can be recorded (comm_timing.py)."""
        return self.strategy is not None and self.strategy.comm_hook

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The unwrapped model's state dict, full-size CPU tensors. A collective for fsdp: call on every rank."""
        return self.rules.model_state(self)

    def full_optimizer_state(self) -> dict | None:
        """The optimizer state in plain AdamW's format (global indices in `names` order, the two
        groups) on rank 0, None elsewhere. A collective for every sharded stage: call on every rank."""
        return self.rules.optimizer_state(self)

    def load_optimizer_state(self, state: dict) -> None:
        """Set the optimizer from `full_optimizer_state()`'s format, on every rank (each keeps its shard)."""
        self.rules.load_optimizer_state(self, state)

    def held(self) -> tuple[list, list, dict]:
        """What this rank holds: (parameter tensors, parameters with its gradients, optimizer state)."""
        return self.rules.held(self)

    def scheduler_state(self, sched) -> dict:
        """The schedule's state with one entry per *logical* group (the two of `names`): our FSDP's
        AdamW has one group (its shards), every other stage two; all share one rate."""
        s = sched.state_dict()
        return {**s, **{k: s[k][:1] * 2 for k in ("base_lrs", "_last_lr") if len(s.get(k) or ()) == 1}}

    def load_scheduler_state(self, sched, state: dict) -> None:
        """The inverse of `scheduler_state`, for this optimizer's number of groups."""
        n = len(self.opt.param_groups)
        sched.load_state_dict({**state, **{k: state[k][:n] for k in ("base_lrs", "_last_lr") if k in state}})


def build(
    strategy: Strategy | None, model: nn.Module, o: Options, device: torch.device, rank: int = 0, world_size: int = 1,
    seed: int = 0,
) -> Parallel:  # fmt: skip
    """`strategy` (None: one process, plain AdamW) around `model` (on `device`, every rank the same
    weights), and the sampler factory for this rank (`seed`: the shuffle's)."""
    if strategy is None:
        from torch.utils.data import DistributedSampler

        wrapped, (opt, groups, hooks) = model, adamw(model, _groups(list(model.named_parameters()), o.weight_decay), o)
        sampler = lambda ds: DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=seed)  # noqa: E731
    else:
        wrapped, opt, groups, hooks = strategy.build(model, o, device)
        cls = strategy.impl.sampler_class()
        sampler = lambda ds: cls(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)  # noqa: E731
    _, names, n_decay = groups
    return Parallel(strategy, wrapped, model, opt, sampler, names, n_decay, o.weight_decay, hooks)


def setup(model: nn.Module, config: TrainConfig, env: DistEnv) -> Parallel:
    """The stage `config` names (`config.strategy`) around `model`: wrapper, AdamW (lr `config.lr`, the two
    groups), the sampler factory and, with --comm-hook, each bucket's all-reduce in 16 bits.

    `config` is resolved (train_args.TrainConfig.resolved); the combinations that do not exist were
    refused there (a usage error, exit 2), so nothing is raised here.
    """
    strategy = config.strategy
    p = build(strategy, model, Options.of(config), env.device, env.rank, env.world_size, config.seed)
    if config.comm_hook != "none":  # a DDP stage (train_args refuses the rest): every bucket in 16 bits
        hook = strategy.impl.compress_hook(config.comm_hook)
        if strategy.impl.native and config.report_to == "tensorboard":  # torch's one hook slot: time inside it
            from .comm_timing import timed_allreduce_hook

            p.comm_records = []
            hook = timed_allreduce_hook(p.comm_records, inner=hook)
        p.model.register_comm_hook(None, hook)
    return p
