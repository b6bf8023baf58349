"""FSDP (ZeRO stage 3): each rank keeps only its shard of the parameters, gathering a unit just in time.

ZeRO-1 and ZeRO-2 (zero.py, zero2.py) still hold every parameter on every rank. FSDP
(Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel", VLDB 2023;
ZeRO's P_os+g+p, Rajbhandari et al. SC 2020 §5.3) holds only 1/n of them, and gathers the rest
when it needs them, one *unit* at a time (one transformer layer by default, the rest of the model
in the root unit):

    forward of unit k:   all-gather its flat parameter (flat_param.py) -> compute -> free it
                         (meanwhile unit k+1's all-gather is already on the wire: prefetch)
    backward of unit k:  all-gather it again -> compute the gradients -> free it ->
                         reduce-scatter its gradient (each rank keeps its averaged chunk)
                         (meanwhile unit k-1's all-gather is on the wire)
    step:                the optimizer steps each rank's shards only: no communication

Peak parameter memory is then one or two full units plus 1/n of the rest. Communication per
step: two all-gathers and one reduce-scatter of the parameters, 3 (n-1)/n Psi elements per rank,
1.5x DDP's all-reduce (2 (n-1)/n Psi).

How the full parameters are swapped in and out of the unmodified model:
- At wrap time each unit's trainable parameters are taken out of their modules and replaced by
  a `FlatParameter`'s shard (registered on this wrapper, so `wrapper.parameters()` is what the
  optimizer steps). Frozen parameters stay whole on every rank (no gradient, no optimizer state;
  FSDP2 shards them too: they only cost memory here).
- A forward pre-hook gathers the unit and sets each module attribute (`linear.weight`) to a view
  of the full flat tensor, produced by `_Unshard`, an autograd Function whose backward receives
  the gradient of every view: the unit's gradients, all at once, when the unit's backward is done.
  That is where the reduce-scatter starts, while autograd goes on with earlier units.
- Autograd keeps what backward needs (Linear keeps its weight). A saved-tensor hook
  (`torch.autograd.graph.saved_tensors_hooks`) stores a view of the full parameter as a small
  handle instead, so the forward post-hook can free the full parameter; in backward the handle
  gathers the unit again. torch's FSDP1 frees storage in place instead (`resize_(0)`), FSDP2 keeps
  per-parameter DTensors; the handle is the shortest correct form.
- A callback queued on autograd's engine (as in reducer.py) waits for the reduce-scatters at the
  end of backward and writes each shard's `.grad` (adding to one already there, as autograd would).

Mixed precision (torch's `MixedPrecisionPolicy(param_dtype, reduce_dtype)`): with
`compute_dtype=torch.bfloat16` the shard (master weight) is cast before the all-gather, so the
wire carries bf16, forward and backward run in bf16 (floating-point inputs of each unit are cast,
as FSDP2's `cast_forward_inputs`), gradients are cast to `reduce_dtype` (default: compute_dtype)
for the reduce-scatter and to fp32 into `.grad`; the optimizer steps fp32 shards.

Limits: every rank must run the same units forward and backward, in the same order (they pair
collectives), and a unit whose parameters get no gradient on one rank only hangs the others;
a parameter shared by two units is refused (put both users in one unit, or let the root own it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd import Variable

from .flat_param import FlatParameter, ShardComm, clip_grad_norm_
from .replicas import broadcast_from, verify_same_model


def default_units(module: nn.Module) -> list[nn.Module]:
    """One unit per transformer layer: every child of every `nn.ModuleList` in `module`
    (`model.layers`, Hugging Face's `transformer.layer` / `encoder.layer`), outermost lists only."""
    units, inside = [], set()
    for m in module.modules():
        if isinstance(m, nn.ModuleList) and id(m) not in inside:
            units.extend(m)
            inside.update(id(d) for child in m for d in child.modules())
    return units


class _Handle:
    """What autograd keeps instead of a view of a unit's full parameter (see the module docstring)."""

    def __init__(self, unit: Unit, t: torch.Tensor):
        self.unit, self.offset, self.shape, self.stride = unit, t.storage_offset(), t.shape, t.stride()


class _Unshard(torch.autograd.Function):
    """Forward: the unit's parameters as views of its gathered full tensor. Backward: their
    gradients, handed to the unit (reduce-scatter); the shard's gradient is written later."""

    @staticmethod
    def forward(ctx, shard, unit):
        ctx.unit = unit
        return tuple(unit.flat.views(unit.flat.full))

    @staticmethod
    def backward(ctx, *grads):
        ctx.unit.post_backward(grads)
        return None, None


class Unit:
    """One FSDP unit: a module, the flat parameter of the trainable parameters it owns, its hooks.

    Args:
        fsdp: the wrapper (for the forward/backward order and the end-of-backward callback).
        name: the module's qualified name ("" for the root).
        module: the unit's module.
        trainable: [(parameter, [(module, attribute name), ...])]: each parameter once, with
            every place it sits (a tied weight sits in two).
        frozen: the same for parameters with requires_grad=False (kept whole).
    """

    def __init__(self, fsdp, name, module, trainable, frozen, comm, compute_dtype, reduce_dtype):
        self.fsdp, self.name, self.module = fsdp, name, module
        self.slots = [places for _, places in trainable]
        self.frozen = frozen
        self.compute_dtype = compute_dtype
        self.flat = None
        if trainable:
            self.flat = FlatParameter([p for p, _ in trainable], comm, compute_dtype, reduce_dtype, name=self.name)
        for _, places in trainable + frozen:
            for mod, attr in places:
                delattr(mod, attr)  # no longer a registered parameter: set per forward instead
        self.pending: torch.futures.Future | None = None  # the reduce-scatter in flight
        self._saved_hooks = None
        self.reshard()
        module.register_forward_pre_hook(self.pre_forward, with_kwargs=True)
        module.register_forward_hook(self.post_forward)

    # ---- forward ------------------------------------------------------------------------
    def pre_forward(self, module, args, kwargs):
        self.fsdp.record_forward(self)
        if self.flat is not None:
            self.flat.wait_all_gather()
            self.fsdp.prefetch_after(self, self.fsdp.forward_order)
            for view, places in zip(_Unshard.apply(self.flat.shard, self), self.slots):
                for mod, attr in places:
                    setattr(mod, attr, view)
        for p, places in self.frozen:
            value = p.detach() if self.compute_dtype is None else p.detach().to(self.compute_dtype)
            for mod, attr in places:
                setattr(mod, attr, value)
        if torch.is_grad_enabled() and self.flat is not None:
            self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
            self._saved_hooks.__enter__()
            self.fsdp.open_hooks.append(self)
        if self.compute_dtype is not None:
            args, kwargs = _cast(args, self.compute_dtype), _cast(kwargs, self.compute_dtype)
        return args, kwargs

    def post_forward(self, module, args, output):
        self.exit_saved_hooks()
        self.reshard()
        self.fsdp.forward_done(self)
        return output

    def exit_saved_hooks(self) -> None:
        if self._saved_hooks is not None:
            self._saved_hooks.__exit__(None, None, None)
            self._saved_hooks = None
            self.fsdp.open_hooks.remove(self)

    def reshard(self) -> None:
        """Free the full parameter: module attributes become empty placeholders."""
        if self.flat is not None:
            self.flat.free()
            for places in self.slots:
                for mod, attr in places:
                    setattr(mod, attr, torch.empty(0, dtype=self.flat.compute_dtype, device=self.flat.device))

    # ---- what autograd keeps --------------------------------------------------------------
    def pack(self, t: torch.Tensor):
        full = self.flat.full
        if full is not None and t.device == full.device and _same_storage(t, full):
            return _Handle(self, t)
        return t

    @staticmethod
    def unpack(saved):
        if isinstance(saved, _Handle):
            full = saved.unit.unshard_for_backward()
            return full.as_strided(saved.shape, saved.stride, saved.offset)
        return saved

    # ---- backward ------------------------------------------------------------------------
    def unshard_for_backward(self) -> torch.Tensor:
        if self.flat.full is None:
            self.flat.wait_all_gather()
            self.fsdp.prefetch_after(self, self.fsdp.backward_order)
        return self.flat.full

    def post_backward(self, grads) -> None:
        self.fsdp.queue_finalize_backward()
        if self.pending is not None:  # the unit ran twice in one backward: sum its gradients first
            self.fsdp.collect(self)
        self.pending = self.flat.launch_reduce_scatter(list(grads))
        self.reshard()


class FullyShardedDataParallel(nn.Module):
    """Shards `module`'s parameters across the ranks of `process_group`, one flat parameter per unit.

    Args:
        module: the model, on this rank's device; every rank builds the same one (rank 0's
            parameters and buffers are broadcast at wrap time, as in our DDP).
        process_group: None = the default group.
        units: the submodules that become units (default `default_units`: each transformer
            layer); the root module is always a unit too and owns every parameter left over.
        collectives: "torch" (`dist.all_gather_single`, `dist.reduce_scatter_tensor`) or
            "ring" (ours, collectives.py, on work.py's worker thread).
        compute_dtype: e.g. torch.bfloat16: gather, compute and (unless reduce_dtype)
            reduce in it; None = the parameters' dtype (torch: `MixedPrecisionPolicy.param_dtype`).
        reduce_dtype: dtype of the gradient reduce-scatter (torch: `reduce_dtype`).
        prefetch: start the next unit's all-gather before the current one computes (forward
            and backward), so it overlaps compute; False gathers each unit only when needed.

    `parameters()` yields the shards (1-D, numel_padded/n, the parameters' dtype): give those
    to the optimizer. `full_state_dict()` / `load_full_state_dict()` are the model's full,
    unsharded state dict (collectives: call them on every rank).

    Raises:
        RuntimeError: no process group, or ranks wrap different models.
        ValueError: a parameter is shared by two units; unknown `collectives`.
    """

    def __init__(
        self,
        module: nn.Module,
        process_group=None,
        units: list[nn.Module] | None = None,
        collectives: str = "torch",
        compute_dtype: torch.dtype | None = None,
        reduce_dtype: torch.dtype | None = None,
        prefetch: bool = True,
    ):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("FullyShardedDataParallel needs a process group: call init_process_group() first")
        self.module, self.process_group, self.prefetch = module, process_group, prefetch
        self.rank = dist.get_rank(process_group)
        verify_same_model(module, process_group)
        comm = ShardComm(process_group, collectives)
        broadcast_from([p.data for p in module.parameters()] + list(module.buffers()), 0, process_group)
        self._keys = self._state_dict_sources(module)
        unit_modules = [module, *(default_units(module) if units is None else units)]
        owner = {}  # id(submodule) -> index of the innermost unit holding it
        for k, u in enumerate(unit_modules):  # later (inner) units override outer ones
            owner.update((id(m), k) for m in u.modules())
        names = {id(m): n or "root" for n, m in module.named_modules()}
        found: dict[int, tuple] = {}  # id(param) -> (unit index, param, places)
        for m in module.modules():
            for attr, p in m.named_parameters(recurse=False):
                k, _, places = found.setdefault(id(p), (owner[id(m)], p, []))
                if k != owner[id(m)]:
                    raise ValueError(
                        f"a parameter is shared by units {names[id(unit_modules[k])]!r} and "
                        f"{names[id(unit_modules[owner[id(m)]])]!r}: "
                        "FSDP gathers one unit at a time; let one unit hold both users (e.g. leave them to the root)"
                    )
                places.append((m, attr))
        self.units: list[Unit] = []
        self._param_of: dict[int, tuple[Unit, int]] = {}  # id(trainable param) -> (unit, index in its flat)
        for k, u in enumerate(unit_modules):
            mine = [(p, places) for j, p, places in found.values() if j == k]
            trainable = [(p, pl) for p, pl in mine if p.requires_grad]
            frozen = [(p, pl) for p, pl in mine if not p.requires_grad]
            unit = Unit(self, names[id(u)], u, trainable, frozen, comm, compute_dtype, reduce_dtype)
            self.units.append(unit)
            self._param_of.update((id(p), (unit, i)) for i, (p, _) in enumerate(trainable))
        self.shards = nn.ParameterList([u.flat.shard for u in self.units if u.flat is not None])
        self.forward_order: list[Unit] = []
        self.backward_order: list[Unit] = []
        self._order_known = False
        self.open_hooks: list[Unit] = []
        self._callback_queued = False

    @staticmethod
    def _state_dict_sources(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
        return list(module.state_dict(keep_vars=True).items())

    def forward(self, *args, **kwargs):
        try:
            return self.module(*args, **kwargs)
        except BaseException:
            for unit in reversed(list(self.open_hooks)):  # a failed forward must not leave hooks behind
                unit.exit_saved_hooks()
            for unit in self.units:
                unit.reshard()
            raise

    # ---- order and prefetch ------------------------------------------------------------
    def record_forward(self, unit: Unit) -> None:
        if not self._order_known and unit not in self.forward_order:
            self.forward_order.append(unit)

    def forward_done(self, unit: Unit) -> None:
        if unit is self.units[0] and not self._order_known:  # the root's forward ends last
            self._order_known = True
            rest = [u for u in reversed(self.forward_order) if u is not unit]
            self.backward_order = [unit, *rest]  # the root's head is used first in backward

    def prefetch_after(self, unit: Unit, order: list[Unit]) -> None:
        """Start the all-gather of the unit after `unit` in `order` (forward or backward order)."""
        if self.prefetch and self._order_known and unit in order:
            k = order.index(unit) + 1
            if k < len(order) and order[k].flat is not None and order[k].pending is None:
                order[k].flat.launch_all_gather()

    # ---- end of backward ---------------------------------------------------------------
    def queue_finalize_backward(self) -> None:
        if not self._callback_queued:
            Variable._execution_engine.queue_callback(self._finalize_backward)
            self._callback_queued = True

    def collect(self, unit: Unit) -> None:
        """Wait for the unit's reduce-scatter; its averaged chunk goes into (or adds to) `shard.grad`."""
        grad = unit.pending.wait().to(unit.flat.dtype)
        unit.pending = None
        shard = unit.flat.shard
        shard.grad = grad if shard.grad is None else shard.grad.add_(grad)

    def _finalize_backward(self) -> None:
        self._callback_queued = False
        for unit in self.units:
            if unit.pending is not None:
                self.collect(unit)
        for unit in self.units:
            unit.reshard()  # a prefetched gather nobody used, or a unit unpacked late

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the sharded gradients by their global 2-norm (flat_param.clip_grad_norm_): what
        `torch.nn.utils.clip_grad_norm_(model.parameters())` would do unsharded. Every rank calls it."""
        return clip_grad_norm_(list(self.shards), max_norm, self.process_group)

    # ---- checkpoints -------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unwrapped model's `state_dict()`: same keys and order (tied weights under both
        names), full-size CPU tensors in the parameters' own dtype. Call on every rank (one
        all-gather per unit); every rank gets the whole dict."""
        full = {id(u): u.flat.full_tensors() for u in self.units if u.flat is not None}
        out = {}
        for key, t in self._keys:
            if id(t) in self._param_of:
                u, i = self._param_of[id(t)]
                t = full[id(u)][i]
            out[key] = t.detach().cpu().clone()
        return out

    def load_full_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Set every shard (and the frozen parameters and buffers) from a full state dict, as
        `full_state_dict()` returns or the unwrapped model saves; no communication.

        Raises: KeyError naming a missing key; ValueError on a shape mismatch.
        """
        per_unit: dict[int, list] = {id(u): [None] * len(u.slots) for u in self.units}
        for key, t in self._keys:
            if key not in state_dict:
                raise KeyError(f"state dict has no {key!r}")
            value = state_dict[key]
            if tuple(value.shape) != tuple(t.shape):
                raise ValueError(f"{key}: shape {tuple(value.shape)} in the state dict, {tuple(t.shape)} in the model")
            if id(t) in self._param_of:
                u, i = self._param_of[id(t)]
                per_unit[id(u)][i] = value
            else:
                with torch.no_grad():
                    t.copy_(value)
        for u in self.units:
            if u.flat is not None:
                u.flat.load_full(per_unit[id(u)])

    # ---- optimizer state (checkpoints) ---------------------------------------------------
    def parameter_names(self) -> dict[int, str]:
        """id(trainable parameter) -> its first name in the unwrapped model's state dict."""
        names: dict[int, str] = {}
        for key, t in self._keys:
            if id(t) in self._param_of:
                names.setdefault(id(t), key)
        return names

    def full_optim_state(self, optim: torch.optim.Optimizer) -> dict[str, dict]:
        """The state `optim` holds for the shards, per parameter at full size: {parameter name:
        {"step": ..., "exp_avg": tensor shaped like the parameter, ...}} (CPU tensors), the state
        a plain optimizer of the unwrapped model would hold. Collective (one all-gather per unit
        and state tensor): call on every rank; every rank gets the whole dict. Elementwise
        optimizers only (their state tensors have the shard's shape; others are copied as they are).
        """
        names, out = self.parameter_names(), {}
        for u in self.units:
            if u.flat is None:
                continue
            state = optim.state.get(u.flat.shard, {})
            members = [names[id(p)] for p in self.unit_parameters(u)]
            for key, value in sorted(state.items()):
                if torch.is_tensor(value) and value.shape == u.flat.shard.shape:
                    full = [t.cpu() for t in u.flat.full_tensors(value)]
                else:
                    full = [value.detach().cpu().clone() if torch.is_tensor(value) else value] * len(members)
                for name, v in zip(members, full):
                    out.setdefault(name, {})[key] = v
        return out

    def shard_optim_state(self, per_name: dict[str, dict]) -> dict[nn.Parameter, dict]:
        """The inverse of `full_optim_state`: {shard: its state} cut from full-size per-parameter
        states (every rank passes the same); for `optim.load_state_dict`. A unit none of whose
        parameters has a state is left out (never stepped). No communication."""
        names, out = self.parameter_names(), {}
        for u in self.units:
            if u.flat is None:
                continue
            states = [per_name.get(names[id(p)]) for p in self.unit_parameters(u)]
            if any(s is None for s in states):
                continue
            entry = {}
            for key, value in states[0].items():
                if torch.is_tensor(value) and value.dim() > 0:
                    entry[key] = u.flat.shard_of([s[key].to(u.flat.device) for s in states])
                else:
                    entry[key] = value
            out[u.flat.shard] = entry
        return out

    def unit_parameters(self, unit: Unit) -> list[torch.Tensor]:
        """The unit's trainable parameters, in flat order (as they were at wrap time)."""
        found = [(i, pid) for pid, (u, i) in self._param_of.items() if u is unit]
        by_id = {id(t): t for _, t in self._keys}
        return [by_id[pid] for _, pid in sorted(found)]


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _cast(x, dtype: torch.dtype):
    """Floating-point tensors in `x` (nested tuples, lists, dicts) cast to `dtype`."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    return x
