"""The whole state of a run as one process would hold it: how each stage reads and sets it.

One rule per way of holding the state, used by the strategy table (parallel.py's `Strategy.state`):
every rank whole (DDP), the optimizer state sharded (ZeRO-1), the gradients too (ZeRO-2), flat shards
of everything (our FSDP), DTensors (torch's FSDP2). `model_state` and `optimizer_state` are collectives
where the state is sharded (every rank calls them; rank 0 gets the result, the others None);
`held` says what each rank holds, for the memory benchmark. Checkpoints and snapshots write the
result, so any stage's checkpoint loads in one process and any stage resumes from any other's snapshot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .parallel import Parallel


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class Replicated:
    """Every rank holds the whole model and optimizer (DDP, one process)."""

    def model_state(self, p: Parallel) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in p.inner.state_dict().items()}

    def optimizer_state(self, p: Parallel) -> dict | None:
        return p.opt.state_dict() if _rank() == 0 else None

    def load_optimizer_state(self, p: Parallel, state: dict) -> None:
        p.opt.load_state_dict(state)

    def held(self, p: Parallel) -> tuple[list, list, dict]:
        """(tensors held as parameters, parameters whose .grad this rank holds, optimizer state by parameter)."""
        params = list(p.inner.parameters())
        return params, params, p.opt.state


class ShardedOptimizer(Replicated):
    """ZeRO-1: the model is whole on every rank, each rank holds the optimizer state of its part."""

    def optimizer_state(self, p: Parallel) -> dict | None:
        p.opt.consolidate_state_dict(to=0)
        return p.opt.state_dict() if _rank() == 0 else None

    def held(self, p: Parallel) -> tuple[list, list, dict]:
        params = list(p.inner.parameters())
        return params, params, p.opt.optim.state


class ShardedGradients(ShardedOptimizer):
    """ZeRO-2: the optimizer state and the gradients are sharded (the shards are views of flat buffers)."""

    def held(self, p: Parallel) -> tuple[list, list, dict]:
        shards = [q for g in p.opt.optim.param_groups for q in g["params"]]
        return list(p.inner.parameters()), shards, p.opt.optim.state


class OurShards(Replicated):
    """Our FSDP: flat shards of parameters, gradients and state; one AdamW group (ShardDecay decays)."""

    def model_state(self, p: Parallel) -> dict[str, torch.Tensor]:
        return p.model.full_state_dict()

    def optimizer_state(self, p: Parallel) -> dict | None:
        per_name = p.model.full_optim_state(p.opt)  # one all-gather per unit and moment
        hyper = {k: v for k, v in p.opt.param_groups[0].items() if k != "params"}
        groups = [
            {**hyper, "weight_decay": p.weight_decay, "params": list(range(p.n_decay))},
            {**hyper, "weight_decay": 0.0, "params": list(range(p.n_decay, len(p.names)))},
        ]
        state = {i: per_name[n] for i, n in enumerate(p.names) if n in per_name}
        return {"state": state, "param_groups": groups} if _rank() == 0 else None

    def load_optimizer_state(self, p: Parallel, state: dict) -> None:
        per_name = {p.names[i]: s for i, s in state["state"].items()}
        index = {id(s): k for k, s in enumerate(p.opt.param_groups[0]["params"])}  # by identity
        cut = p.model.shard_optim_state(per_name)
        hyper = {k: v for k, v in state["param_groups"][0].items() if k not in ("params", "weight_decay")}
        group = {**p.opt.param_groups[0], **hyper, "params": list(range(len(index)))}
        p.opt.load_state_dict({"state": {index[id(s)]: v for s, v in cut.items()}, "param_groups": [group]})

    def held(self, p: Parallel) -> tuple[list, list, dict]:
        extra = [t for mod in p.inner.modules() for t in vars(mod).values() if torch.is_tensor(t)]
        shards = list(p.model.parameters())
        return [*shards, *extra], shards, p.opt.state  # with any full parameter still gathered


class DTensorShards(Replicated):
    """torch's FSDP2: parameters, gradients and moments are DTensors, each rank holding its slice."""

    def model_state(self, p: Parallel) -> dict[str, torch.Tensor]:
        from ddp_native.sharded import full_state_dict

        return full_state_dict(p.model)

    def optimizer_state(self, p: Parallel) -> dict | None:
        from torch.distributed.tensor import DTensor

        full = p.opt.state_dict()  # gather each moment (the same order on every rank)
        full["state"] = {
            i: {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone() for k, v in s.items()}
            for i, s in sorted(full["state"].items())
        }
        return full if _rank() == 0 else None

    def load_optimizer_state(self, p: Parallel, state: dict) -> None:
        from torch.distributed.tensor import distribute_tensor

        params = [q for g in p.opt.param_groups for q in g["params"]]
        cut = {}
        for i, s in sorted(state["state"].items()):  # each rank keeps its slice of every moment (no communication)
            q = params[i]
            cut[i] = {
                k: distribute_tensor(v.to(q.device), q.device_mesh, q.placements, src_data_rank=None)
                if torch.is_tensor(v) and v.dim() > 0
                else v
                for k, v in s.items()
            }
        p.opt.load_state_dict({**state, "state": cut})

    def held(self, p: Parallel) -> tuple[list, list, dict]:
        params = list(p.model.parameters())
        return params, params, p.opt.state
