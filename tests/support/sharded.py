"""The tiny transformer language model and the training loop the ZeRO and FSDP tests share.

tests/sharded/test_zero.py, test_zero_memory.py and test_fsdp.py train `make_model()` (a 2-layer
transformer LM: head tied to the embedding, `pos` and one LayerNorm bias frozen; seed 0) with
`train()`: STEPS steps, rank r on micro-batch r of each seeded global batch of ids, AdamW at LR
from `adamw()`. Their workers run in spawned ranks, which import this module by name.

`lockstep()` compares implementations where their sums run in different orders: a leader trains,
and at every step each follower is loaded with the leader's parameters and computes its averaged
gradient on the same micro-batch (`Plain`, `Zero2`, `OursFSDP`, `TorchFSDP` read each kind's
gradients; `ReduceScatterTerms` reads the per-rank terms our FSDP averages).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from support.numerics import gradient_terms, mean_magnitudes

STEPS, MICRO_BATCH, SEQ, VOCAB, DIM = 10, 2, 6, 32, 16
LR = 1e-2


class Block(nn.Module):
    """Pre-norm attention + MLP: one transformer layer (one FSDP unit)."""

    def __init__(self, dim: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)  # a key bias has zero gradient
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(att)
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Embedding -> 2 blocks -> norm -> head tied to the embedding; `pos` and one LayerNorm bias frozen."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.randn(SEQ, DIM) * 0.1, requires_grad=False)
        self.layers = nn.ModuleList([Block(DIM), Block(DIM)])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.layers[0].ln1.bias.requires_grad_(False)

    def forward(self, ids):
        x = self.emb(ids) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def make_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def global_batches(world_size: int, steps: int = STEPS):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        yield torch.randint(0, VOCAB, (world_size * MICRO_BATCH, SEQ + 1), generator=g)


def loss_of(model, ids):
    logits = model(ids[:, :-1]).reshape(-1, VOCAB)
    if logits.dtype in (torch.bfloat16, torch.float16):  # the loss in float32; a float64 model keeps float64
        logits = logits.float()
    return F.cross_entropy(logits, ids[:, 1:].reshape(-1))


def train(model, opt, world_size: int, rank, steps: int = STEPS, skip: int = 0, keep_grads: bool = False, clip=None):
    """`steps` steps on global batches `skip`, `skip+1`, ...; rank r takes micro-batch r (all if rank is None).
    keep_grads: no zero_grad after the last step (test_zero_memory.py measures the gradients).
    clip: clip gradients to this global 2-norm before each step (sharded: the wrapper's or optimizer's method)."""
    for k, ids in enumerate(global_batches(world_size, skip + steps)):
        if k < skip:
            continue
        if rank is not None:
            ids = ids[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
        loss_of(model, ids).backward()
        if clip is not None:
            sharded = getattr(opt, "clip_grad_norm_", None) or getattr(model, "clip_grad_norm_", None)
            sharded(clip) if sharded else torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if not (keep_grads and k == skip + steps - 1):
            opt.zero_grad(set_to_none=True)
    inner = getattr(model, "module", model)
    return {k: v.detach().clone() for k, v in inner.state_dict().items()}


def adamw(params):
    return torch.optim.AdamW(params, lr=LR)


# ---- lockstep: gradients compared at the same parameters, before any optimizer step -------------
# (tests/support/numerics.py says why: AdamW amplifies a rounding difference of the averaged
# gradient, so two trainings that average in different orders are compared step by step instead.)


class Plain:
    """An unwrapped model (or one under our or torch's DDP: `module` is then the wrapped model) as
    a lockstep leader or follower: its state dict, averaged gradients by name, clipping."""

    def __init__(self, model):
        self.model = model
        self.module = getattr(model, "module", model)

    def state(self) -> dict:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    @torch.no_grad()
    def load(self, state: dict) -> None:
        self.module.load_state_dict(state)  # in place: a parameter viewing a flat buffer stays a view

    def grads(self) -> dict:
        return {n: p.grad.detach().clone() for n, p in self.module.named_parameters() if p.grad is not None}

    def clip(self, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm))

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)


class Zero2(Plain):
    """An unwrapped model whose gradients our Zero2Optimizer `opt` reduce-scatters: the averaged
    gradient is all-gathered from the buckets' chunks (collective)."""

    def __init__(self, model, opt):
        super().__init__(model)
        self.opt = opt

    @torch.no_grad()
    def grads(self) -> dict:
        names = {id(p): n for n, p in self.module.named_parameters()}
        out = {}
        for b in self.opt.buckets:
            flat = torch.zeros(b.numel_padded, dtype=b.shard.dtype)
            flat.tensor_split(self.opt.world_size)[self.opt.rank].copy_(b.shard.grad)
            self.opt.comm.all_gather(flat).wait()
            for p, o, k in zip(b.params, b.offsets, b.numels):
                out[names[id(p)]] = flat[o : o + k].view_as(p).clone()
        return out

    def clip(self, max_norm: float) -> float:
        return float(self.opt.clip_grad_norm_(max_norm))

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)


class OursFSDP(Plain):
    """Our FullyShardedDataParallel: full state dicts in and out, averaged gradients gathered per unit."""

    def state(self) -> dict:
        return self.model.full_state_dict()

    def load(self, state: dict) -> None:
        self.model.load_full_state_dict(state)

    def grads(self) -> dict:
        names, out = self.model.parameter_names(), {}
        for u in self.model.units:
            if u.flat is not None and u.flat.shard.grad is not None:
                for p, g in zip(self.model.unit_parameters(u), u.flat.full_tensors(u.flat.shard.grad)):
                    out[names[id(p)]] = g
        return out

    def clip(self, max_norm: float) -> float:
        return float(self.model.clip_grad_norm_(max_norm))


class TorchFSDP(Plain):
    """torch's fully_shard (ddp_native.sharded.fsdp): DTensor parameters and gradients, gathered."""

    def state(self) -> dict:
        from ddp_native.sharded import full_state_dict

        return full_state_dict(self.model)

    def grads(self) -> dict:
        params = self.model.named_parameters()
        return {n: p.grad.full_tensor().detach().clone() for n, p in params if p.grad is not None}

    def clip(self, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def view_of(model, opt) -> Plain:
    """The view (`Plain`, `Zero2`, `OursFSDP` or `TorchFSDP`) that reads `model`'s state and averaged
    gradients, whichever stage built it (experiments/parallel.py: any DDP or ZeRO-1, our ZeRO-2, our or
    torch's FSDP)."""
    from ddp_from_scratch.fsdp import FullyShardedDataParallel
    from ddp_from_scratch.zero2 import Zero2Optimizer

    if isinstance(opt, Zero2Optimizer):
        return Zero2(model, opt)
    if isinstance(model, FullyShardedDataParallel):
        return OursFSDP(model)
    if any(hasattr(p, "full_tensor") for p in model.parameters()):
        return TorchFSDP(model)
    return Plain(model)


class ReduceScatterTerms:
    """S = sum over ranks of |g_r| / n (numerics.py) for our FSDP, read from the gradients each rank
    hands to its units' reduce-scatters: exactly the terms averaged, in whatever dtype they were
    computed (bf16 compute included), with no second backward. `terms()` all-reduces what the last
    backward recorded (collective) and returns it by parameter name."""

    def __init__(self, fsdp):
        self.fsdp, self.sums = fsdp, {}
        for u in fsdp.units:
            if u.flat is not None:
                u.flat.launch_reduce_scatter = self._recording(u.flat, u.flat.launch_reduce_scatter)

    def _recording(self, flat, launch):
        def launch_reduce_scatter(grads):
            t = self.sums.setdefault(id(flat), torch.zeros(flat.numel_padded, dtype=torch.float64))
            for g, o, k in zip(grads, flat.offsets, flat.numels):
                if g is not None:
                    t[o : o + k] += g.detach().reshape(-1).double().abs()
            return launch(grads)

        return launch_reduce_scatter

    def terms(self, *_) -> dict:
        import torch.distributed as dist

        names, out = self.fsdp.parameter_names(), {}
        for u in self.fsdp.units:
            if u.flat is None:
                continue
            t = self.sums.pop(id(u.flat), torch.zeros(u.flat.numel_padded, dtype=torch.float64))
            dist.all_reduce(t)
            t /= u.flat.comm.world_size
            for p, v in zip(self.fsdp.unit_parameters(u), u.flat.views(t)):
                out[names[id(p)]] = v.clone()
        return out


def reordering_terms(base, world_size, rank):
    """`terms` for `lockstep`: S at the leader's parameters of each step (numerics.gradient_terms, a plain copy
    of `base` on this rank's micro-batch; collective)."""

    def terms(state, ids):
        local = copy.deepcopy(base)
        local.load_state_dict(state)
        mine = ids[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
        return gradient_terms(local, lambda m: loss_of(m, mine), world_size)

    return terms


def one_process_terms(base64, rank):
    """`terms` for a one-process `lockstep` (float64 `base64`): on rank 0, the per-sample gradient magnitudes
    of the global batch at the leader's parameters (numerics.mean_magnitudes); None elsewhere."""

    def terms(state, ids):
        if rank != 0:
            return None
        single = copy.deepcopy(base64)
        single.load_state_dict(state)
        return mean_magnitudes(single, [lambda m, i=i: loss_of(m, ids[i : i + 1]) for i in range(len(ids))])

    return terms


def lockstep(leader, opt, followers: dict, world_size: int, rank: int, clip=None, terms=None, one_process=False):
    """STEPS steps of `leader` (a `Plain`-like, optimizer `opt`); at each, every follower is loaded with
    the leader's parameters of that step and runs backward (and clipping) on the same micro-batch,
    without stepping. Returns per step {"leader": its averaged (clipped) gradient, "norm": its norm
    before clipping, name: each follower's, "S": terms(state, global batch)}.

    one_process: the leader runs the whole global batch (the one-process reference); rank r's
    followers micro-batch r. Every rank calls this (followers' collectives pair step by step).
    """
    out = []
    for ids in global_batches(world_size):
        micro = ids[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
        state = leader.state()
        loss_of(leader.model, ids if one_process else micro).backward()
        record = {}
        if clip is not None:
            record["norm"] = leader.clip(clip)
        record["leader"] = leader.grads()
        for name, f in followers.items():
            f.load(state)
            loss_of(f.model, micro).backward()
            if clip is not None:
                f.clip(clip)
            record[name] = f.grads()
            f.zero_grad()
        if terms is not None:
            record["S"] = terms(state, ids)
        out.append(record)
        opt.step()
        leader.zero_grad()
    return out
