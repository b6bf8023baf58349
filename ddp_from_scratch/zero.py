"""ZeRO stage 1: each rank keeps the optimizer state of its shard of the parameters only.

DDP leaves every rank with the same averaged gradients and has every rank take the same
optimizer step on all parameters: AdamW's two fp32 moments (8 bytes per parameter) are held
n times over. ZeRO-1 (Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", SC 2020, §5.1, P_os) cuts that redundancy:

1. the parameters are partitioned across ranks, once (`partition_parameters`);
2. every rank still receives all averaged gradients (DDP's all-reduce, ours or torch's:
   this class does not care which), but steps only its own parameters, so optimizer
   state exists for those only: 8 bytes / n per parameter instead of 8;
3. the updated parameters then travel from their owner to every other rank
   (`sync="all_gather"`: one all-gather per dtype; `sync="broadcast"`: one broadcast per rank
   and dtype, what torch does), so all replicas are identical again for the next forward.

The partition is torch's (torch/distributed/optim/zero_redundancy_optimizer.py,
`_partition_parameters`), on purpose: whole parameters, each parameter group sorted by size
(largest first), each parameter given to the rank holding the fewest elements so far, the
running totals carried across groups. Whole parameters mean the wrapped optimizer sees real
parameters, so any `torch.optim.Optimizer` works, per-parameter rules included (LAMB's trust
ratio, Adafactor's factored moments); the same partition means the same rank steps the same
parameter in ours and torch's, so the two can be compared bit for bit. ZeRO-2 (zero2.py) cuts
parameters into equal flat pieces instead, because a reduce-scatter splits a bucket by elements.

Communication per step: the all-reduce of DDP (2(n-1)/n * Psi elements per rank) plus the
all-gather of the parameters ((n-1)/n * Psi): 1.5x DDP's bytes. ZeRO's paper reduce-scatters
the gradients instead of all-reducing them (stage 2), which makes the total DDP's 2(n-1)/n * Psi.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import collectives, debug
from .comm_hooks import make_comm_state


def partition_parameters(param_groups: list[dict], world_size: int) -> list[list[list[torch.Tensor]]]:
    """Assign each parameter to one rank: `result[rank][group]` lists that rank's parameters of that group.

    torch's `ZeroRedundancyOptimizer._partition_parameters`: within a group, largest first
    (a stable sort, so equal sizes keep their order), each to the rank with the fewest
    elements so far (the lowest such rank on a tie), totals carried from group to group.
    Frozen parameters take part too, as in torch (they are stepped by nobody).
    """
    sizes = [0] * world_size
    result = [[[] for _ in param_groups] for _ in range(world_size)]
    for g, group in enumerate(param_groups):
        for p in sorted(group["params"], key=lambda t: t.numel(), reverse=True):
            rank = sizes.index(min(sizes))
            result[rank][g].append(p)
            sizes[rank] += p.numel()
    return result


def indexed_groups(param_groups: list[dict]) -> list[dict]:
    """The parameter groups in torch.optim's state-dict format: hyperparameters, and each parameter
    as its global index (0, 1, ... over all groups in order), as one process would save them."""
    groups, start = [], 0
    for g in param_groups:
        groups.append(
            {**{k: v for k, v in g.items() if k != "params"}, "params": list(range(start, start + len(g["params"])))}
        )
        start += len(g["params"])
    return groups


def load_hyperparameters(param_groups: list[dict], saved: list[dict]) -> None:
    """Copy a saved state dict's hyperparameters (lr, betas, ...) into `param_groups`, in place.

    Raises: ValueError if the parameter groups do not match in number or size.
    """
    if [len(g["params"]) for g in saved] != [len(g["params"]) for g in param_groups]:
        raise ValueError(
            "state dict has parameter groups of sizes "
            f"{[len(g['params']) for g in saved]}, this optimizer {[len(g['params']) for g in param_groups]}"
        )
    for full, g in zip(param_groups, saved):
        full.update({k: v for k, v in g.items() if k != "params"})


def hyperparameters(group: dict) -> dict:
    """A parameter group's hyperparameters (everything but "params")."""
    return {k: v for k, v in group.items() if k != "params"}


class ShardedOptimizer(torch.optim.Optimizer):
    """What ZeRO-1 (below) and ZeRO-2 (zero2.py) share: the model's parameters in `param_groups` (for LR
    schedulers and `zero_grad`), `self.optim` stepping only this rank's part of them, the step (the
    hyperparameters copied to `self.optim`, its step, then `sync_parameters()` gives every rank the
    updated parameters) and the consolidated state dict in torch.optim's format (torch's
    ZeroRedundancyOptimizer has the same interface: `consolidate_state_dict(to)`, then `state_dict()`).

    A subclass makes its local parameter groups, calls `_local_optimizer`, and writes `sync_parameters`
    and `consolidate_state_dict` (which fills `_consolidated` on the receiving rank).

    Raises: RuntimeError: no process group.
    """

    def __init__(self, params, defaults: dict):
        if not dist.is_initialized():
            raise RuntimeError(f"{type(self).__name__} needs a process group: call init_process_group() first")
        super().__init__(params, defaults)
        self.debug = debug.enabled()
        self.index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}  # global
        self._consolidated: dict | None = None

    def _local_optimizer(self, optimizer_class, local_groups: list[dict], defaults: dict) -> None:
        """`self.optim`: `optimizer_class` on this rank's groups (one per group of `param_groups`, in order)."""
        self.optim = optimizer_class(local_groups, **defaults)
        for full, mine in zip(self.param_groups, self.optim.param_groups):
            full.update(hyperparameters(mine))  # the optimizer's own defaults (betas, eps, ...) become visible
        self.defaults = dict(self.optim.defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """Step this rank's part, then give every rank the updated parameters. Returns the closure's loss."""
        for mine, full in zip(self.optim.param_groups, self.param_groups):
            mine.update(hyperparameters(full))  # an LR scheduler changed `self.param_groups`
        loss = self.optim.step(closure)
        self.sync_parameters()
        return loss

    def sync_parameters(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The whole optimizer's state in torch.optim's format, as one process with `optimizer_class`
        on all parameters would save it (global indices): loadable by that optimizer too.

        Raises: RuntimeError if `consolidate_state_dict(to=this rank)` was not called first.
        """
        if self._consolidated is None:
            raise RuntimeError(
                f"rank {self.rank} holds only its shard: call consolidate_state_dict(to={self.rank}) on every rank"
            )
        return {"state": dict(sorted(self._consolidated.items())), "param_groups": indexed_groups(self.param_groups)}


class ZeroRedundancyOptimizer(ShardedOptimizer):
    """ZeRO-1: `optimizer_class(**defaults)` on this rank's shard of the parameters only.

    Args:
        params: parameters or parameter groups, as for any optimizer (every rank the same, in
            the same order: normally `model.parameters()`).
        optimizer_class: the optimizer to shard, e.g. `torch.optim.AdamW`.
        process_group: the group to shard over (None = the default group).
        collectives: "torch" (`dist.all_gather_single` / `dist.broadcast`) or "ring" (ours,
            collectives.py): the same choice as our DDP's `all_reduce=`.
        sync: "all_gather" (each rank's parameters packed into chunk r of one flat tensor per
            dtype, padded to the largest shard: one all-gather) or "broadcast" (each owner
            broadcasts its packed parameters: n broadcasts, torch's `_sync_params`).
        **defaults: the optimizer's keyword arguments (lr, betas, weight_decay, ...).

    `param_groups` holds every parameter, as the user passed them, so LR schedulers and
    `zero_grad()` work on the whole model; hyperparameters are copied to the local optimizer at
    each `step()`. `state` stays empty: the state lives in `self.optim` (this rank's shard).

    Raises:
        RuntimeError: no process group. ValueError: unknown `collectives` or `sync`.
    """

    def __init__(
        self,
        params,
        optimizer_class,
        process_group=None,
        collectives: str = "torch",
        sync: str = "all_gather",
        **defaults,
    ):
        if sync not in ("all_gather", "broadcast"):
            raise ValueError(f"sync must be 'all_gather' or 'broadcast', got {sync!r}")
        super().__init__(params, defaults)
        self.process_group, self.sync = process_group, sync
        self.rank, self.world_size = dist.get_rank(process_group), dist.get_world_size(process_group)
        self.comm_state = make_comm_state(process_group, collectives)  # raises on a typo, on every rank
        self.partition = partition_parameters(self.param_groups, self.world_size)
        self.owner = {p: r for r, groups in enumerate(self.partition) for g in groups for p in g}
        local = [{**hyperparameters(g), "params": ps} for g, ps in zip(self.param_groups, self.partition[self.rank])]
        self._local_optimizer(optimizer_class, local, defaults)

    # ---- the step (ShardedOptimizer.step, then this) ------------------------------------
    def _shard(self, rank: int, dtype: torch.dtype) -> list[torch.Tensor]:
        return [p for g in self.partition[rank] for p in g if p.dtype == dtype]

    @torch.no_grad()
    def sync_parameters(self) -> None:
        """Every rank's parameters <- their owner's, one collective per dtype (all-gather) or per rank and dtype."""
        for dtype in sorted({p.dtype for g in self.param_groups for p in g["params"]}, key=str):
            shards = [self._shard(r, dtype) for r in range(self.world_size)]
            if self.sync == "all_gather":
                width = max(sum(p.numel() for p in s) for s in shards)
                device = next(p for s in shards for p in s).device
                flat = torch.zeros(width * self.world_size, dtype=dtype, device=device)
                chunks = flat.tensor_split(self.world_size)  # equal chunks: ours and torch's agree
                _pack(shards[self.rank], chunks[self.rank])
                start, timer = self._timer(device)
                self.comm_state.all_gather(flat).wait()
                self._log("all_gather", flat, start, timer)
                for r, shard in enumerate(shards):
                    if r != self.rank:
                        _unpack(chunks[r], shard)
            else:
                for r, shard in enumerate(shards):
                    if not shard:
                        continue
                    flat = torch.empty(sum(p.numel() for p in shard), dtype=dtype, device=shard[0].device)
                    if r == self.rank:
                        _pack(shard, flat)
                    start, timer = self._timer(flat.device)
                    self._broadcast(flat, r)
                    self._log(f"broadcast(from {r})", flat, start, timer)
                    if r != self.rank:
                        _unpack(flat, shard)

    def _broadcast(self, flat: torch.Tensor, src: int) -> None:
        if self.comm_state.algorithm == "ring":
            collectives.broadcast(flat, src=src, group=self.process_group)
        else:
            glob = dist.get_global_rank(self.process_group, src) if self.process_group is not None else src
            dist.broadcast(flat, src=glob, group=self.process_group)

    def _timer(self, device: torch.device) -> tuple[float, debug.CollectiveTimer | None]:
        """(wall seconds, a timer started in stream order) right before a collective, for its debug line."""
        return debug.now(), debug.CollectiveTimer(device) if self.debug else None

    def _log(self, op: str, flat: torch.Tensor, start: float, timer: debug.CollectiveTimer | None) -> None:
        """The debug line of a collective just waited for (its timer stops here, on the stream that waited)."""
        if timer is not None:
            timer.stop()
            nbytes = flat.numel() * flat.element_size()
            op = f"{op}/{self.comm_state.algorithm}(zero-1 params)"
            debug.log_timed(timer, self.rank, op, None, nbytes, self.comm_state.peers, start)

    # ---- checkpoints ------------------------------------------------------------------
    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collect every rank's optimizer state on rank `to` (of the group); call on every rank.

        Each rank sends {global parameter index: its state}, tensors moved to the CPU (gathered
        objects are pickled); afterwards `state_dict()` works on rank `to` (torch's method of
        the same name). Cost: one gather of Psi*8/n bytes per rank for AdamW.
        """
        mine = {self.index[p]: _to_cpu(s) for p, s in self.optim.state.items()}
        everyone = [None] * self.world_size if self.rank == to else None
        dst = dist.get_global_rank(self.process_group, to) if self.process_group is not None else to
        dist.gather_object(mine, everyone, dst=dst, group=self.process_group)
        self._consolidated = None
        if self.rank == to:
            self._consolidated = {i: s for part in everyone for i, s in part.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a full state dict (from `state_dict()`, or from a plain optimizer over the same
        parameters) on every rank: each keeps the state of its own shard only (resharded).

        Raises: ValueError if the parameter groups do not match in number or size.
        """
        load_hyperparameters(self.param_groups, state_dict["param_groups"])
        local_groups, local_state, k = [], {}, 0
        for full, mine in zip(self.param_groups, self.optim.param_groups):
            ids = []
            for p in mine["params"]:
                if self.index[p] in state_dict["state"]:
                    local_state[k] = state_dict["state"][self.index[p]]
                ids.append(k)
                k += 1
            local_groups.append({**hyperparameters(full), "params": ids})
        self.optim.load_state_dict({"state": local_state, "param_groups": local_groups})


def _pack(params: list[torch.Tensor], out: torch.Tensor) -> None:
    offset = 0
    for p in params:
        out[offset : offset + p.numel()].copy_(p.detach().reshape(-1))
        offset += p.numel()


def _unpack(flat: torch.Tensor, params: list[torch.Tensor]) -> None:
    offset = 0
    for p in params:
        p.detach().copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def _to_cpu(state: dict) -> dict:
    return {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in state.items()}
