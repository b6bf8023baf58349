"""Every feature of the hand-written DDP, held against torch's DDP and a single process.

Real processes (gloo, CPU), world sizes 2 and 3, one spawn per world size: each rank
runs every case below and saves what it saw; the test process then compares ranks,
implementations and a single-process reference it computes itself.

The model (`Net`) has every awkward parameter kind at once: odd sizes (5, 6, 7, 3, 11),
a 1-element parameter, a frozen layer, a layer whose bias alone is frozen, a layer
applied twice, an embedding tied to an output head, optionally BatchNorm (buffers) and
an optional branch that the forward may skip (unused parameters).

What is compared, and why it holds on any CPU (tests/support/numerics.py derives the bounds):
- ours against torch's DDP, 2 ranks: the final parameters and buffers, and the first averaged
  gradients, bit for bit. Each rank computes its gradient the same way under both wrappers, and
  the average of two numbers has one addition (a + b == b + a; dividing by 2 is exact), whatever
  the buckets; SGD and AdamW then do the same arithmetic on the same numbers.
- ours against torch's DDP, 3 ranks, in lockstep: three gradients are added in another order
  ((a+b)+c or a+(b+c), by the bucket layout), and AdamW amplifies that rounding. So torch's DDP
  trains (`train`), and at every step ours is loaded with its parameters and buffers of that step
  (`train(..., follow=...)`); the averaged gradient must lie within n * eps * S of torch's, with
  S = sum over ranks of |g_r| / n from each rank's own gradient (`train(..., plain=...)`), and the
  buffers must be equal. The fp16/bf16 compression hooks: the same, with the 16-bit dtype's eps
  and the 16-bit terms (`hook_bounds`).
- against one process, in float64, in lockstep: torch's DDP trains in float64, and the test process
  computes the one-process gradient at each of its steps (`single_grads`: the global batch, or the
  mean of per-micro-batch losses where micro-batches differ) within 2^-30 of the largest
  per-sample gradient element (float64 rounding is about 2^-38 of it). Ours equals torch's DDP
  above, so it equals one process too.
Every comparison also checks that it could fail: some gradient is 1000 times its bound, and on 2
ranks training moved the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from support.numerics import (
    assert_can_fail,
    assert_within,
    float64_bounds,
    mean_magnitudes,
    reordering_bound,
    terms_of,
)
from support.spawn import run, world_sizes
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import ddp_native
from ddp_from_scratch import DistributedDataParallel as Ours
from ddp_from_scratch import NaiveDistributedDataParallel as Naive
from ddp_from_scratch import comm_hooks

STEPS, MB = 3, 4  # optimizer steps per case; samples per rank per micro-batch
CAPS = {"per-param": 1e-6, "default": 25.0, "one-bucket": 1e4}  # MiB
PG_TIMEOUT_S = 20.0  # short, so that a hang fails the test quickly
ALL = lambda r, s, k: True  # every rank uses the branch, every step and micro-batch


# ----------------------------------------------------------------------------- model and data
class Net(nn.Module):
    def __init__(self, bn: bool = False, branch: bool = False, out: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6)
        self.inp = nn.Linear(5, 6)
        self.frozen = nn.Linear(6, 6).requires_grad_(False)
        self.fb = nn.Linear(6, 7)
        self.fb.bias.requires_grad_(False)  # frozen bias, trained weight
        self.bn = nn.BatchNorm1d(7) if bn else None
        self.shared = nn.Linear(7, 7)  # applied twice: one parameter, two uses
        self.scale = nn.Parameter(torch.tensor([0.5]))  # 1 element
        self.out = nn.Linear(7, out)
        self.branch = nn.Linear(7, out) if branch else None
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, x, tok, use_branch: bool = True):
        h = torch.tanh(self.inp(x) + self.emb(tok))
        h = torch.tanh(self.frozen(h))
        z = torch.relu(self.fb(h))
        if self.bn is not None:
            z = self.bn(z)
        z = torch.tanh(self.shared(torch.tanh(self.shared(z)))) * self.scale
        logits = self.out(z)
        if self.branch is not None and use_branch:
            logits = logits + self.branch(z)
        return logits, self.head(h)


def loss_of(model, batch, use_branch=True, weight=1.0):
    x, tok, y = batch
    logits, tok_logits = model(x, tok, use_branch)
    return weight * (nn.functional.cross_entropy(logits, y) + nn.functional.cross_entropy(tok_logits, tok))


def global_batch(step: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(1000 * seed + step)
    return (
        torch.randn(n, 5, generator=g),
        torch.randint(0, 11, (n,), generator=g),
        torch.randint(0, 3, (n,), generator=g),
    )


def piece(batch, k: int, size: int = MB):
    return tuple(t[k * size : (k + 1) * size] for t in batch)


def make_opt(name, params):
    return torch.optim.SGD(params, lr=0.1) if name == "sgd" else torch.optim.AdamW(params, lr=1e-2)


def snapshot(model):
    return {k: v.detach().clone() for k, v in getattr(model, "module", model).state_dict().items()}


def grads(model):
    m = getattr(model, "module", model)
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in m.named_parameters()}


def buffers(model):
    return {k: v.detach().clone() for k, v in getattr(model, "module", model).named_buffers()}


def in_dtype(batch, dtype):
    x, tok, y = batch
    return x.to(dtype), tok, y


def local_grads(plain, state, batch, rank, micro, use) -> dict:
    """This rank's own gradient at `state` (before any averaging): an unwrapped model from `plain()`
    on the same micro-batches, as the rank computes it under any wrapper."""
    net = plain()
    net.load_state_dict(state)
    for k in range(micro):
        loss_of(net, piece(batch, rank * micro + k), use(k), 1.0 / micro).backward()
    return grads(net)


def train(model, opt_name, world, rank, steps=STEPS, micro=1, use_branch=ALL, seed=0, follow=None, plain=None):
    """`steps` steps; rank r uses piece r of each global batch (`micro` pieces with no_sync).

    follow: a leader's trail (lockstep): at every step this model is first loaded with the leader's
        parameters and buffers of that step, and it never steps itself.
    plain: makes the unwrapped model (`Net(...)`, in the model's dtype): each step also records this
        rank's own gradient at that step (`local_grads`), the terms of the reordering bound.
    Returns {"params": final state dict, "grads": first averaged gradients, "trail": per step
    {"state": state dict before it (leaders), "grads": averaged gradients, "buffers": after the
    forward, "local": this rank's own gradient (with `plain`)}}.
    """
    opt = make_opt(opt_name, model.parameters())
    dtype = next(model.parameters()).dtype
    trail = []
    for s in range(steps):
        batch = in_dtype(global_batch(s, world * MB * micro, seed), dtype)
        if follow is not None:
            with torch.no_grad():
                getattr(model, "module", model).load_state_dict(follow[s]["state"])
        entry = {} if follow is not None else {"state": snapshot(model)}
        if plain is not None:
            entry["local"] = local_grads(
                plain, snapshot(model), batch, rank, micro, lambda k, s=s: use_branch(rank, s, k)
            )
        for k in range(micro):  # the first micro-1 under no_sync, then one synced
            ctx = model.no_sync() if k < micro - 1 else contextlib.nullcontext()
            with ctx:
                loss_of(model, piece(batch, rank * micro + k), use_branch(rank, s, k), 1.0 / micro).backward()
        entry["grads"], entry["buffers"] = grads(model), buffers(model)
        trail.append(entry)
        if follow is None:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return {"params": snapshot(model), "grads": trail[0]["grads"], "trail": trail}


def single_grads(state, s, world, micro=1, bn=False, branch=False, use_branch=ALL, per_rank=False, active=None):
    """One process in float64 at `state` (step s): its gradient and the magnitudes it adds up.

    The concatenated global batch, or (per_rank) the derived form: the mean over ranks and
    micro-batches of each micro-batch's loss, which is what DDP's averaged gradient is the gradient
    of (needed when micro-batches differ: BatchNorm statistics, unused branch, join, where `active`
    lists the ranks still training and DDP divides by the full world size even so). Magnitudes
    (numerics.mean_magnitudes): per sample, or per micro-batch with BatchNorm (a one-sample batch
    has no statistics).
    """
    model = Net(bn=bn, branch=branch).double()
    model.load_state_dict(state)
    batch = in_dtype(global_batch(s, world * MB * micro), torch.float64)
    ranks = range(world) if active is None else active
    pieces = [(r, k) for r in ranks for k in range(micro)]
    if per_rank:
        losses = [loss_of(model, piece(batch, r * micro + k), use_branch(r, s, k)) for r, k in pieces]
        loss = sum(losses) / (world * micro)
    else:
        loss = loss_of(model, batch)
    loss.backward()
    want = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    if bn:
        parts = [lambda m, r=r, k=k: loss_of(m, piece(batch, r * micro + k), use_branch(r, s, k)) for r, k in pieces]
    else:
        parts = [
            lambda m, r=r, k=k, i=i: loss_of(m, piece(piece(batch, r * micro + k), i, 1), use_branch(r, s, k))
            for r, k in pieces
            for i in range(MB)
        ]
    return want, mean_magnitudes(model, parts)


def ours(model, **kw):
    return Ours(model, first_bucket_cap_mb=min(1.0, kw.get("bucket_cap_mb", 25.0)), **kw)


def native(model, **kw):
    return ddp_native.wrap(model, torch.device("cpu"), **kw)


def lead(world, make):
    """`train` keywords for torch's DDP where it leads ours (3 ranks): record each rank's own gradient."""
    return {"plain": make} if world > 2 else {}


def follow(world, leader):
    """`train` keywords for ours: in lockstep behind `leader`'s result on 3 ranks; in full on 2."""
    return {"follow": leader["trail"]} if world > 2 else {}


def reference64(make, opt, world, rank, **kw):
    """torch's DDP trained in float64 (default buckets), its trail for the one-process comparison."""
    return train(native(make().double()), opt, world, rank, **kw)


# ----------------------------------------------------------------------------- worker cases
# Each returns {label: result}; the worker stores them under the case's key.


def case_matrix(rank, world):
    """Every option combination that must not change the numbers."""
    out = {}
    for bn in (False, True):
        for opt in ("sgd", "adamw"):
            out[("native64", bn, opt)] = reference64(lambda bn=bn: Net(bn), opt, world, rank)
            for cap_name, cap in CAPS.items():
                for gav in (False, True) if cap_name != "one-bucket" else (False,):  # gradient_as_bucket_view
                    nat = native(Net(bn), bucket_cap_mb=cap, gradient_as_bucket_view=gav)
                    nat = out[("native", bn, opt, cap_name, gav)] = train(
                        nat, opt, world, rank, **lead(world, lambda bn=bn: Net(bn))
                    )
                    for coll in ("torch", "ring"):
                        m = ours(Net(bn), bucket_cap_mb=cap, all_reduce=coll, gradient_as_bucket_view=gav)
                        out[(coll, bn, opt, cap_name, gav)] = train(m, opt, world, rank, **follow(world, nat))
                        if not gav:
                            out[("n_buckets", bn, cap_name)] = len(m.reducer.buckets)
    return out


def case_no_sync(rank, world):
    """3 micro-batches: 2 under no_sync, then 1 synced, per optimizer step."""
    out = {}
    for bn in (False, True):
        out[("native64", bn)] = reference64(lambda bn=bn: Net(bn), "sgd", world, rank, micro=3)
        nat = out[("native", bn, False)] = train(
            native(Net(bn)), "sgd", world, rank, micro=3, **lead(world, lambda bn=bn: Net(bn))
        )
        for coll in ("torch", "ring"):
            for gav in (False, True):
                m = ours(Net(bn), all_reduce=coll, gradient_as_bucket_view=gav)
                out[(coll, bn, gav)] = train(m, "sgd", world, rank, micro=3, **follow(world, nat))
        out[("naive", bn)] = train(Naive(Net(bn)), "sgd", world, rank, micro=3, **follow(world, nat))
    return out


def case_hooks(rank, world):
    """fp16/bf16 compression hooks, ours vs torch's default_hooks on native DDP."""
    out = {}
    for name in ("fp16_compress_hook", "bf16_compress_hook"):
        n = native(Net())
        # torch refuses a hook *named* bf16_compress_hook without CUDA/NCCL (a name check in
        # _check_comm_hook); gloo adds bfloat16 fine, so we call torch's hook through a wrapper.
        n.register_comm_hook(None, lambda state, bucket, hook=getattr(default_hooks, name): hook(state, bucket))
        nat = out[("native", name)] = train(n, "sgd", world, rank, **lead(world, Net))
        for coll in ("torch", "ring"):
            # ours without a hook, per collective: a hook that did nothing would equal it bit for bit
            out[(coll, "fp32", name)] = train(ours(Net(), all_reduce=coll), "sgd", world, rank, **follow(world, nat))
            m = ours(Net(), all_reduce=coll)
            m.register_comm_hook(None, getattr(comm_hooks, name))
            out[(coll, name)] = train(m, "sgd", world, rank, **follow(world, nat))
    return out


UNUSED = {  # which ranks use the branch, per scenario
    "unused-on-rank-0": lambda r, s, k: r != 0,
    "used-on-rank-0-only": lambda r, s, k: r == 0,
    "unused-everywhere": lambda r, s, k: False,
    "varies-per-step": lambda r, s, k: (r + s) % 2 == 0,
    "no_sync-early-use": lambda r, s, k: k < 2,  # used under no_sync only, not in the synced micro-batch
}


def case_unused(rank, world):
    out = {}
    for scen, fn in UNUSED.items():
        # no_sync-early-use: 3 micro-batches, the branch used in the 2 under no_sync only, so its
        # gradient was accumulated locally and must still be averaged at the synced step
        micro = 3 if scen.startswith("no_sync") else 1
        make = lambda: Net(branch=True)
        for opt in ("sgd", "adamw"):
            kw = {"micro": micro, "use_branch": fn}
            out[("native64", scen, opt)] = train(
                native(make().double(), find_unused_parameters=True), opt, world, rank, **kw
            )
            nat = out[("native", scen, opt)] = train(
                native(make(), find_unused_parameters=True), opt, world, rank, **kw, **lead(world, make)
            )
            for coll in ("torch", "ring"):
                for gav in (False, True):
                    m = ours(make(), find_unused_parameters=True, all_reduce=coll, gradient_as_bucket_view=gav)
                    out[(coll, scen, opt, gav)] = train(m, opt, world, rank, **kw, **follow(world, nat))
    return out


def join_batches(world):
    return [3, 5, 4][:world]  # rank r trains on this many batches


def train_join(model, opt_name, world, rank, follow=None, plain=None):
    """`train` under join(): rank r trains on join_batches(world)[r] batches (same trail and keywords)."""
    opt = make_opt(opt_name, model.parameters())
    dtype = next(model.parameters()).dtype
    trail = []
    with model.join():
        for s in range(join_batches(world)[rank]):
            if follow is not None:
                with torch.no_grad():
                    model.module.load_state_dict(follow[s]["state"])
            entry = {} if follow is not None else {"state": snapshot(model)}
            batch = in_dtype(piece(global_batch(s, world * MB), rank), dtype)
            if plain is not None:
                entry["local"] = local_grads(plain, snapshot(model), batch, 0, 1, lambda k: True)
            loss_of(model, batch).backward()
            entry["grads"], entry["buffers"] = grads(model), buffers(model)
            trail.append(entry)
            if follow is None:
                opt.step()
            opt.zero_grad(set_to_none=True)
    return {"params": snapshot(model), "grads": trail[0]["grads"], "trail": trail}


def case_join(rank, world):
    out = {}
    for bn, opt in ((False, "sgd"), (False, "adamw"), (True, "sgd")):
        make = lambda bn=bn: Net(bn)
        out[("native64", bn, opt)] = train_join(native(make().double()), opt, world, rank)
        start = time.monotonic()
        nat = out[("native", bn, opt)] = train_join(native(make()), opt, world, rank, **lead(world, make))
        for coll in ("torch", "ring"):
            out[(coll, bn, opt)] = train_join(ours(make(), all_reduce=coll), opt, world, rank, **follow(world, nat))
        out[("seconds", bn, opt)] = time.monotonic() - start
    m = ours(Net(True))  # BatchNorm: buffers, which a no_grad forward would broadcast
    x, tok, _ = piece(global_batch(0, world * MB), rank)
    with m.join():
        loss_of(m, piece(global_batch(1, world * MB), rank)).backward()  # a synced step: buffers to sync next
        with torch.no_grad():
            out["no_grad-in-join"] = _error_of(lambda: m(x, tok))[0]
        out["no_sync-in-join"] = _error_of(lambda: m.no_sync().__enter__())[0]
    return out


class Wide(nn.Module):
    """~1.1 MB of gradients in 10 tensors; `b1` and `b2` run in an order that depends on the rank,
    so the ranks see gradients become ready in different orders."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b1, self.b2 = nn.Linear(40, 300), nn.Linear(300, 300), nn.Linear(300, 300)
        self.c, self.d = nn.Linear(300, 300), nn.Linear(300, 4)

    def forward(self, x, swap: bool):
        h = torch.tanh(self.a(x))
        u, v = (self.b2(h), self.b1(h)) if swap else (self.b1(h), self.b2(h))  # creation order = backward order
        return self.d(torch.tanh(self.c(torch.tanh(u) + torch.tanh(v))))


def _wide_steps(model, rank, steps, on_step=None):
    opt = make_opt("sgd", model.parameters())
    for s in range(steps):
        if on_step:
            on_step(s)
        model(global_batch(s, 2)[0].repeat(1, 8), swap=rank % 2 == 1).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def case_buckets(rank, world):
    out = {}
    # (1) small caps, so that b2 and b1 land in different buckets: bucket 0 holds b2 on rank 0's order
    m = Ours(Wide(), bucket_cap_mb=0.3, first_bucket_cap_mb=0.5)
    order = []
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p, i=i: order.append(i)) for i, p in enumerate(m.reducer.params)
    ]

    def step_hook(s):
        if s == 1:
            for h in hooks:
                h.remove()
            m.reducer.timeline = []  # record bucket times after the rebuild

    _wide_steps(m, rank, 3, step_hook)
    out["small"] = {
        "ready_order": order,
        "buckets": [b.param_indices for b in m.reducer.buckets],
        "bytes": [b.nbytes for b in m.reducer.buckets],
        "timeline": m.reducer.timeline,
        "names": m.reducer.param_names,
    }
    # (2) default caps (1 MB first bucket, 25 MB others): ours vs torch's DDP built with its defaults
    # (not ddp_native.wrap, which passes bucket_cap_mb explicitly and so turns torch's small first bucket off)
    n = torch.nn.parallel.DistributedDataParallel(Wide())
    _wide_steps(n, rank, 2)
    names = {p.data_ptr(): name for name, p in n.module.named_parameters()}
    native_buckets = [[names[p.data_ptr()] for p in b.parameters()] for b in n.reducer._get_zeros_like_grad_buckets()]
    m = Ours(Wide())
    _wide_steps(m, rank, 2)
    out["default"] = {
        "ours": [[m.reducer.param_names[i] for i in b.param_indices] for b in m.reducer.buckets],
        "bytes": [b.nbytes for b in m.reducer.buckets],
        "native": native_buckets,
    }
    return out


def case_debug(rank, world):
    out = {}
    os.environ["DDP_FROM_SCRATCH_DEBUG"] = "1"
    try:
        for coll in ("torch", "ring"):
            old, sys.stderr = sys.stderr, io.StringIO()
            try:
                m = ours(Net(), bucket_cap_mb=1e-6, all_reduce=coll)  # one bucket per parameter
                m.reducer.timeline = []
                train(m, "sgd", world, rank, steps=2)
                # a line is printed by the future's done-callback, which may run just after wait() returned
                deadline = time.monotonic() + 5
                while (
                    sys.stderr.getvalue().count(" bucket=") - sys.stderr.getvalue().count(" bucket=-")
                    < len(m.reducer.timeline)
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.01)
                time.sleep(0.05)  # and nothing more comes
                log = sys.stderr.getvalue()
            finally:
                sys.stderr = old
            out[coll] = {"log": log, "timeline": m.reducer.timeline, "n_params": len(m.reducer.params)}
    finally:
        del os.environ["DDP_FROM_SCRATCH_DEBUG"]
    return out


def _error_of(fn):
    """(message of the RuntimeError fn raised or None, seconds it took)."""
    start = time.monotonic()
    try:
        fn()
    except RuntimeError as e:
        return str(e), time.monotonic() - start
    return None, time.monotonic() - start


def case_errors(rank, world):
    """Last: promised errors, on every rank, fast. The process group must still work afterwards."""
    out = {
        "mismatch-shape": _error_of(lambda: Ours(Net(out=4 if rank == 1 else 3))),
        "mismatch-frozen": _error_of(lambda: Ours(_frozen_out_bias(rank))),
    }
    batch = piece(global_batch(0, world * MB), rank)
    for scen, uses in (("missing-everywhere", lambda r: False), ("missing-on-rank-1", lambda r: r != 1)):
        for coll in ("torch", "ring"):
            m = ours(Net(branch=True), all_reduce=coll)
            out[(scen, coll)] = _error_of(lambda m=m, uses=uses: loss_of(m, batch, uses(rank)).backward())
    x = torch.ones(1)
    dist.all_reduce(x)
    out["pg-still-works"] = x.item()
    return out


def _frozen_out_bias(rank):
    net = Net()
    net.out.bias.requires_grad_(rank != 1)
    return net


class AuxNet(nn.Module):
    """A loss head and an auxiliary output that a micro-batch may leave out of its loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.aux = nn.Linear(3, 1), nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return self.lin(x).sum(), (self.aux * x[:, :2]).sum()


def case_recovery(rank, world):
    """State that must not outlive one iteration: a backward that raised, and a parameter reached
    by find_unused_parameters' graph walk whose gradient the synced backward never computed."""
    out = {}
    batch = piece(global_batch(0, world * MB), rank)
    for name, make in (("ours", lambda: ours(Net())), ("naive", lambda: Naive(Net()))):
        m = make()
        hook = m.module.emb.weight.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("user hook")))
        try:  # the embedding's gradient comes last: the buckets of later layers were launched
            loss_of(m, batch).backward()
        except RuntimeError as e:
            out[(name, "raised")] = str(e)
        hook.remove()
        m.zero_grad(set_to_none=True)
        loss_of(m, batch).backward()  # must sync as usual
        out[(name, "grads")] = grads(m)
    ref = native(Net())
    loss_of(ref, batch).backward()
    out[("native", "grads")] = grads(ref)
    out["local"] = local_grads(Net, snapshot(Net()), batch, 0, 1, lambda k: True)  # the terms, on 3 ranks
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(world * MB, 3, generator=g) for _ in range(2)]
    for gav in (False, True):
        m = ours(AuxNet(), find_unused_parameters=True, gradient_as_bucket_view=gav)
        with m.no_sync():  # micro-batch 1: aux in the loss, accumulated locally
            main, aux = m(piece((xs[0],), rank)[0])
            (main + aux).backward()
        main, aux = m(piece((xs[1],), rank)[0])  # micro-batch 2: aux returned, not in the loss
        main.backward()
        out[("aux", gav)] = grads(m)
    out["xs"] = xs
    return out


CASES = ("matrix", "no_sync", "hooks", "unused", "buckets", "join", "debug", "recovery", "errors")


def _worker(rank, world, out_path):
    results = {}
    for name in CASES:
        start = time.monotonic()
        results[name] = globals()[f"case_{name}"](rank, world)
        results[("seconds", name)] = time.monotonic() - start
    torch.save(results, f"{out_path}.rank{rank}")


# ----------------------------------------------------------------------------- checks (test process)
# ----------------------------------------------------------------------------- checks (test process)
@pytest.fixture(scope="module", params=world_sizes(2, 3), ids=lambda w: f"world{w}")
def spawned(request, tmp_path_factory):
    """Run every case on `world` real processes once; returns (world, [rank 0's results, ...])."""
    world = request.param
    tmp = tmp_path_factory.mktemp(f"features{world}")
    run(_worker, world, tmp, str(tmp / "res"), timeout_s=PG_TIMEOUT_S)
    return world, [torch.load(f"{tmp / 'res'}.rank{r}") for r in range(world)]


def buffer_names(bn=False):
    return {n for n, _ in Net(bn).named_buffers()}


FROZEN = ("frozen.weight", "frozen.bias", "fb.bias")
START = {bn: snapshot(Net(bn)) for bn in (False, True)}


def given(grads: dict) -> dict:
    """The gradients that exist (a parameter no rank used has None)."""
    return {k: g for k, g in grads.items() if g is not None}


def assert_equal(got: dict, want: dict, where) -> None:
    assert got.keys() == want.keys(), (where, sorted(got.keys() ^ want.keys()))
    for k, ref in want.items():
        if ref is None or got[k] is None:
            assert got[k] is None and ref is None, (where, k, "a gradient on one side only")
        else:
            assert torch.equal(got[k], ref), (where, k, float((got[k].double() - ref.double()).abs().max()))


def reordering(world):
    """The bound of reordering `world` float32 gradients, from every rank's own gradient."""

    def bounds(local: list[dict]) -> dict:
        return {k: reordering_bound(s, world, torch.float32) for k, s in terms_of(local, world).items()}

    return bounds


def assert_follows(ranks, case, leader, follower, world, where, bounds=None, room=1e3) -> None:
    """`follower` (ours) trained like `leader` (torch's DDP).

    2 ranks: the final parameters and buffers, and the first averaged gradients, bit for bit (one
    addition per element). 3 ranks (lockstep: `follower` was loaded with `leader`'s state every
    step): at every step the averaged gradients within `bounds(each rank's own gradient)` (default:
    the reordering bound) and the buffers bit for bit, the same on every rank; some gradient is
    `room` times its bound, so the comparison can fail.
    """
    if world == 2:
        for r, res in enumerate(ranks):
            got, want = res[case][follower], res[case][leader]
            assert_equal(got["params"], want["params"], (where, r, "final state"))
            assert_equal(got["grads"], want["grads"], (where, r, "first gradients"))
        return
    bounds = bounds or reordering(world)
    trails = [res[case][leader]["trail"] for res in ranks]
    for s in range(max(map(len, trails))):
        here = [r for r in range(world) if s < len(trails[r])]  # under join, the ranks still training
        b = bounds([trails[r][s]["local"] for r in here])
        assert_can_fail(given(trails[here[0]][s]["grads"]), b, (where, s), room)
        for r in here:
            got, want = ranks[r][case][follower]["trail"][s], trails[r][s]
            assert {k for k, g in got["grads"].items() if g is None} == {
                k for k, g in want["grads"].items() if g is None
            }, (where, r, s, "which parameters got a gradient")
            assert_within(given(got["grads"]), given(want["grads"]), b, (where, r, s))
            assert_equal(got["buffers"], want["buffers"], (where, r, s, "buffers"))
            rank0 = ranks[here[0]][case][follower]["trail"][s]["grads"]
            assert_equal(got["grads"], rank0, (where, r, s, "replicas diverged"))


def assert_one_process(trail, where, **single) -> None:
    """float64: torch's DDP's averaged gradient (`trail`, every step) against one process's at the same
    parameters (`single_grads(**single)`), within numerics.FLOAT64_RTOL of the largest magnitude."""
    active = single.pop("active", lambda s: None)
    for s, entry in enumerate(trail):
        want, terms = single_grads(entry["state"], s, active=active(s), **single)
        bounds = float64_bounds(terms)
        assert_can_fail(want, bounds, (where, s))
        assert_within(given(entry["grads"]), want, bounds, (where, s))


def assert_moved(params, bn=False, branch=False):
    """Training moved the weights: equal weights say something."""
    start = snapshot(Net(bn, branch))
    moved = max((params[k] - start[k]).abs().max().item() for k in params if k not in buffer_names(bn))
    assert moved > 1e-2, moved


def test_options_do_not_change_the_numbers(spawned):
    """Both collectives x bucket caps (per-parameter .. one bucket) x gradient_as_bucket_view x SGD/AdamW
    x with/without BatchNorm: ours == native (same options) == one process."""
    world, ranks = spawned
    configs = [(cap, gav) for cap in CAPS for gav in (False, True) if not (gav and cap == "one-bucket")]
    for bn in (False, True):
        for opt in ("sgd", "adamw"):
            # With BatchNorm in train mode each rank normalises its own micro-batch, so the reference
            # is the mean of per-micro-batch losses; running stats are rank-local (compared with native).
            trail = ranks[0]["matrix"][("native64", bn, opt)]["trail"]
            assert_one_process(trail, ("one process", world, bn, opt), world=world, bn=bn, per_rank=bn)
            for cap, gav in configs:
                leader = ("native", bn, opt, cap, gav)
                assert_moved(ranks[0]["matrix"][leader]["params"], bn)
                for coll in ("torch", "ring"):
                    key = (coll, bn, opt, cap, gav)
                    assert_follows(ranks, "matrix", leader, key, world, (world, *key))
                    for r, res in enumerate(ranks):
                        got = res["matrix"][key]
                        for k in FROZEN:  # no gradient, not even zeros (AdamW's weight decay would move it)
                            assert torch.equal(got["params"][k], START[bn][k]) and got["grads"][k] is None, key
                        for k in START[bn].keys() - buffer_names(bn):  # replicas stay bit-identical
                            assert torch.equal(got["params"][k], ranks[0]["matrix"][key]["params"][k]), (r, key)
    for bn in (False, True):
        n_trainable = sum(p.requires_grad for p in Net(bn).parameters())  # tied: once; frozen: not at all
        assert ranks[0]["matrix"][("n_buckets", bn, "per-param")] == n_trainable
        assert ranks[0]["matrix"][("n_buckets", bn, "one-bucket")] == 1


def test_no_sync_accumulates_then_syncs_once(spawned):
    """2 micro-batches under no_sync + 1 synced == one step on all 3 (== native's no_sync)."""
    world, ranks = spawned
    for bn in (False, True):
        # without BN: one process on the whole global batch; with BN: the mean of per-micro-batch losses
        trail = ranks[0]["no_sync"][("native64", bn)]["trail"]
        assert_one_process(trail, ("one process", world, bn), world=world, micro=3, bn=bn, per_rank=bn)
        assert_moved(ranks[0]["no_sync"][("native", bn, False)]["params"], bn)
        # buffers too: BatchNorm stats follow torch's rule of when buffers are broadcast
        for coll in ("torch", "ring"):
            for gav in (False, True):
                assert_follows(ranks, "no_sync", ("native", bn, False), (coll, bn, gav), world, (world, coll, bn, gav))
        if not bn:  # naive.py broadcasts buffers only at wrap time, so BatchNorm stats stay per rank
            assert_follows(ranks, "no_sync", ("native", bn, False), ("naive", bn), world, (world, "naive"))


def hook_bounds(world, dtype):
    """Both hooks round each rank's float32 gradient to `dtype` and divide it by n there, the same
    numbers on both sides (t_r = g_r.to(dtype) / n: recomputed here, elementwise IEEE operations);
    only the order of the n - 1 additions in `dtype` differs. Each addition rounds by at most u of
    a partial sum of at most T = sum_r |t_r| (additions in the subnormal range are exact), so either
    order lies within (n-1) u T of the exact sum, and the two within (n-1) eps T. We allow n eps T:
    the extra eps T covers an addition carried out in float32 and rounded to `dtype` (twice rounded)."""
    eps = torch.finfo(dtype).eps

    def bounds(local: list[dict]) -> dict:
        out = {}
        for k in {k for grads in local for k, g in grads.items() if g is not None}:
            terms = [g[k].to(dtype).div(world).double().abs() for g in local if g.get(k) is not None]
            out[k] = world * eps * sum(terms)
        return out

    return bounds


def test_compression_hooks_match_torch_hooks(spawned):
    """fp16/bf16 compress hooks == torch's default_hooks on native DDP, and really compress."""
    world, ranks = spawned
    for name, dtype in (("fp16_compress_hook", torch.float16), ("bf16_compress_hook", torch.bfloat16)):
        assert_moved(ranks[0]["hooks"][("native", name)]["params"])
        for coll in ("torch", "ring"):
            where = (world, coll, name)
            # 16 bits leave less room: n eps is 3e-3 (fp16) or 2e-2 (bf16) of a gradient; a dropped rank
            # or a missing 1/n still moves gradients by a third of themselves or more
            bounds = hook_bounds(world, dtype)
            assert_follows(ranks, "hooks", ("native", name), (coll, name), world, where, bounds, room=10)
            # the hook really ran: rounding to 16 bits changed the result of the same collective and
            # buckets (float32 would be within the float32 bound of native, but equal to this bit for bit)
            for r, res in enumerate(ranks):
                got, fp32 = res["hooks"][(coll, name)], res["hooks"][(coll, "fp32", name)]
                if world == 2:
                    assert any(not torch.equal(got["params"][k], fp32["params"][k]) for k in fp32["params"]), where
                else:
                    changed = [
                        not torch.equal(a["grads"][k], b["grads"][k])
                        for a, b in zip(got["trail"], fp32["trail"])
                        for k in given(b["grads"])
                    ]
                    assert any(changed), (where, r)


def test_find_unused_parameters(spawned):
    """A branch unused on some ranks / all ranks / under no_sync only: grads (None vs averaged) and
    weights match native DDP and the derived one-process reference."""
    world, ranks = spawned
    branch = ("branch.weight", "branch.bias")
    for scen, uses in UNUSED.items():
        micro = 3 if scen.startswith("no_sync") else 1
        used_somewhere = any(uses(r, 0, k) for r in range(world) for k in range(micro))
        for opt in ("sgd", "adamw"):
            trail = ranks[0]["unused"][("native64", scen, opt)]["trail"]
            single = {"world": world, "micro": micro, "branch": True, "use_branch": uses, "per_rank": True}
            assert_one_process(trail, ("one process", world, scen, opt), **single)
            assert_moved(ranks[0]["unused"][("native", scen, opt)]["params"], branch=True)
            for coll in ("torch", "ring"):
                for gav in (False, True):
                    where = (world, scen, opt, coll, gav)
                    assert_follows(ranks, "unused", ("native", scen, opt), (coll, scen, opt, gav), world, where)
                    for res in ranks:
                        g = res["unused"][(coll, scen, opt, gav)]["grads"]  # after the first backward
                        for name in branch:
                            assert (g[name] is None) == (not used_somewhere), (where, name, g[name])
                            if g[name] is not None:
                                assert g[name].abs().max() > 1e-3, (where, name)  # averaged, not zeros
    # a branch nobody used keeps .grad None and its weights
    start = snapshot(Net(branch=True))
    got = ranks[-1]["unused"][("ring", "unused-everywhere", "adamw", True)]["params"]
    assert all(torch.equal(got[k], start[k]) for k in branch)


def test_join_uneven_inputs(spawned):
    """Ranks with 3/5/4 batches: no hang; == native DDP's join(); every replica ends identical."""
    world, ranks = spawned
    n_batches = join_batches(world)
    last = n_batches.index(max(n_batches))  # the last to join trains every step
    for bn, opt in ((False, "sgd"), (False, "adamw"), (True, "sgd")):
        # steps where some ranks have joined average over fewer samples but still divide by world size
        trail = ranks[last]["join"][("native64", bn, opt)]["trail"]
        active = lambda s: [r for r in range(world) if s < n_batches[r]]
        assert_one_process(trail, ("one process", world, bn, opt), world=world, bn=bn, per_rank=True, active=active)
        assert_moved(ranks[last]["join"][("native", bn, opt)]["params"], bn)
        for coll in ("torch", "ring"):
            assert_follows(ranks, "join", ("native", bn, opt), (coll, bn, opt), world, (world, coll, bn, opt))
            for r, res in enumerate(ranks):
                got = res["join"][(coll, bn, opt)]["params"]
                for k, v in got.items():  # the last joiner's model (buffers included) was broadcast
                    assert torch.equal(v, ranks[0]["join"][(coll, bn, opt)]["params"][k]), (world, r, coll, k)
            assert max(res["join"][("seconds", bn, opt)] for res in ranks) < PG_TIMEOUT_S / 2
    for res in ranks:  # refused at once on every rank, before any collective (they would not pair)
        assert "every forward through the wrapper must be a training forward" in res["join"]["no_grad-in-join"]
        assert "no_sync() inside join() is not supported" in res["join"]["no_sync-in-join"]


def test_buckets_after_rebuild(spawned):
    """Rebuilt once in rank 0's gradient-ready order, identical on every rank, caps respected,
    launched strictly in index order; default caps give torch's buckets."""
    world, ranks = spawned
    small = [res["buckets"]["small"] for res in ranks]
    assert small[0]["ready_order"] != small[1]["ready_order"], "ranks should see different ready orders"
    for s in small:
        assert s["buckets"] == small[0]["buckets"]  # identical membership on every rank
        assert [i for b in s["buckets"] for i in b] == small[0]["ready_order"]  # rank 0's order
    names = small[0]["names"]
    assert_caps([[names[i] for i in b] for b in small[0]["buckets"]], 0.5, 0.3)
    assert len(small[0]["buckets"]) == 3
    for r, s in enumerate(small):
        tl = s["timeline"]
        assert len(tl) == 2 * len(s["buckets"])
        for it in range(2):
            rows = sorted(tl[it * 3 : (it + 1) * 3], key=lambda e: e["bucket"])
            for prev, cur in zip(rows, rows[1:]):
                assert cur["launch"] >= prev["launch"], (r, rows)  # strictly in index order
            for e in rows:
                assert e["ready"] <= e["launch"] <= e["done"], (r, e)
        if r % 2 == 1:  # b1 (bucket 1) is ready before b2 (bucket 0) here, yet bucket 0 goes first
            assert any(tl[i + 1]["ready"] < tl[i]["ready"] for i in (0, 3)), tl
    default = [res["buckets"]["default"] for res in ranks]
    for d in default:
        assert d["ours"] == d["native"] == default[0]["ours"]
    assert_caps(default[0]["ours"], 1.0, 25.0)  # 1 MiB first bucket, then 25 MiB
    assert len(default[0]["ours"]) == 2  # 1.09 MB (8 tensors), then the rest (2 tensors)


def assert_caps(buckets: list[list[str]], first_mb: float, cap_mb: float) -> None:
    """Cap semantics (torch's and ours): a bucket is closed by the member that makes it reach its
    cap, so every bucket minus its last member is below the cap, and every bucket but the last
    reaches it."""
    size = {n: p.numel() * 4 for n, p in Wide().named_parameters()}
    for k, members in enumerate(buckets):
        cap = int((first_mb if k == 0 else cap_mb) * 2**20)
        sizes = [size[n] for n in members]
        assert sum(sizes[:-1]) < cap, (k, members, sizes)
        assert k == len(buckets) - 1 or sum(sizes) >= cap, (k, members, sizes)


LINE = re.compile(
    r"\[ddp_from_scratch\] rank=(\d+) op=(\S+) bucket=(\S+) bytes=(\d+) peers=(\S+) "
    r"start=([\d.]+) end=([\d.]+) ms=([\d.]+)$"
)


def test_debug_logging(spawned):
    """DDP_FROM_SCRATCH_DEBUG=1: one stderr line per collective; per bucket: rank, op, index, bytes,
    peers, start/end, and exactly one line per bucket all-reduce."""
    world, ranks = spawned
    for r, res in enumerate(ranks):
        for coll in ("torch", "ring"):
            d = res["debug"][coll]
            lines = d["log"].strip().splitlines()
            parsed = [LINE.match(line) for line in lines]
            assert all(parsed), [line for line, p in zip(lines, parsed) if not p]
            rows = [p.groups() for p in parsed]
            assert all(int(row[0]) == r and float(row[5]) <= float(row[6]) for row in rows)
            buckets = sorted((int(b), int(n)) for _, op, b, n, *_ in rows if b != "-")
            assert buckets == sorted((e["bucket"], e["bytes"]) for e in d["timeline"])
            assert len(buckets) == 2 * d["n_params"]  # 2 steps, one bucket per parameter
            ops = [op for _, op, b, *_ in rows]
            assert ops.count(f"all_reduce/{coll}") == len(buckets)
            assert ops.count(f"all_reduce/{coll}(used-counts)") == 2
            assert "broadcast(parameters+buffers)" in ops and "broadcast(bucket-order)" in ops
            peers = {row[4] for row in rows if row[1] == f"all_reduce/{coll}"}
            want = sorted({(r - 1) % world, (r + 1) % world} if coll == "ring" else set(range(world)) - {r})
            assert peers == {",".join(map(str, want))}


def test_state_does_not_outlive_a_failed_backward_or_a_missing_gradient(spawned):
    world, ranks = spawned
    eps = torch.finfo(torch.float32).eps
    bounds = reordering(world)([res["recovery"]["local"] for res in ranks])
    for r, res in enumerate(ranks):
        for name in ("ours", "naive"):
            assert "user hook" in res["recovery"].get((name, "raised"), ""), (r, name)  # the first backward raised
            # the next backward synced: every rank holds native's averaged gradients (2 ranks: bit for bit)
            got, want = res["recovery"][(name, "grads")], res["recovery"][("native", "grads")]
            if world == 2:
                assert_equal(got, want, (r, name))
            else:
                assert {k for k, g in got.items() if g is None} == {k for k, g in want.items() if g is None}, name
                assert_within(given(got), given(want), bounds, (r, name))
        xs = res["recovery"]["xs"]
        # aux: only micro-batch 1 gave it a gradient (on every rank): the average of theirs, not zeros.
        # lin.weight[0]: d(lin(x).sum())/dW, summed over both micro-batches. Each side sums the same m
        # float32 samples in its own order and divides by n once: within (m + 1) u sum|x| / n of the
        # exact value (Higham §4.2), the two within (m + 1) eps sum|x| / n.
        want_aux = xs[0][:, :2].sum(0) / world
        bound_aux = (len(xs[0]) + 1) * eps * xs[0][:, :2].abs().sum(0) / world
        want_lin = sum(x.sum(0) for x in xs) / world
        bound_lin = (sum(len(x) for x in xs) + 1) * eps * sum(x.abs().sum(0) for x in xs) / world
        for gav in (False, True):
            g = res["recovery"][("aux", gav)]
            assert bool(((g["aux"] - want_aux).abs() <= bound_aux).all()), (r, gav, g["aux"], want_aux)
            assert bool(((g["lin.weight"][0] - want_lin).abs() <= bound_lin).all()), (r, gav)
            assert g["aux"].abs().max() > 0.1  # not the zeros the bug wrote


def test_errors_are_raised_on_every_rank_quickly(spawned):
    """Mismatched models and a missing gradient: the promised error on every rank, well before the
    process-group timeout, and the group still works afterwards."""
    world, ranks = spawned
    for r, res in enumerate(ranks):
        e = res["errors"]
        msg, secs = e["mismatch-shape"]
        assert msg and "ranks wrap different models" in msg and "out.weight" in msg and secs < 5, (r, e)
        msg, secs = e["mismatch-frozen"]
        assert msg and "out.bias" in msg and secs < 5, (r, e)
        for scen in ("missing-everywhere", "missing-on-rank-1"):
            for coll in ("torch", "ring"):
                msg, secs = e[(scen, coll)]
                assert msg and "got no gradient" in msg and "branch.weight" in msg and "branch.bias" in msg, (r, msg)
                assert "find_unused_parameters=True" in msg
                assert secs < 5, (r, scen, coll, secs)  # the timeout is PG_TIMEOUT_S = 20 s
        assert e["pg-still-works"] == world


@dataclasses.dataclass
class _Output:
    logits: torch.Tensor
    extra: dict


def test_the_graph_walk_finds_parameters_in_any_output_container():
    """find_unused_parameters' walk (unused.py) sees tensors nested in dataclasses, dicts and lists;
    a parameter it missed would count as unused and be reduced twice (an error on every rank)."""
    from ddp_from_scratch.unused import params_reached_by

    a, b, c = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    x = torch.ones(1, 2)
    out = _Output(a(x), {"more": [b(x), 3]})
    assert params_reached_by(out) == {id(p) for p in (*a.parameters(), *b.parameters())}
    assert params_reached_by((c(x).detach(), None)) == set()


def _freed_worker(rank: int, world: int, out_path: str) -> None:
    """Each wrapper (and ZeRO-2, whose hooks follow the same rule) takes one step, is dropped, and
    must then be gone, with its model and parameters, after one gc.collect(); torch's DDP is the reference."""
    import gc
    import weakref

    from ddp_from_scratch import BucketedDistributedDataParallel, OverlapDistributedDataParallel
    from ddp_from_scratch.zero2 import Zero2Optimizer

    wrappers = {
        "naive": Naive,
        "overlap": OverlapDistributedDataParallel,
        "buckets": lambda m: BucketedDistributedDataParallel(m, bucket_cap_mb=40 / 2**20),  # 2 buckets
        "ours": Ours,
        "torch": lambda m: ddp_native.wrap(m, torch.device("cpu")),
        "zero2": lambda m: (m, Zero2Optimizer(m.parameters(), torch.optim.SGD, lr=0.1)),
    }
    alive = {}
    for name, wrap in wrappers.items():
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        wrapped = wrap(model)
        net, opt = wrapped if isinstance(wrapped, tuple) else (wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1))
        net(torch.randn(4, 3)).sum().backward()
        opt.step()
        refs = [weakref.ref(o) for o in (model, net, opt, model[0].weight)]  # a parameter: a reducer would hold it
        del model, wrapped, net, opt
        gc.collect()
        alive[name] = sum(r() is not None for r in refs)
    torch.save(alive, f"{out_path}.rank{rank}")


def test_a_dropped_wrapper_frees_its_model(tmp_path):
    """A gradient hook lives in autograd's C++ node, out of the garbage collector's sight: one that held
    its wrapper would keep every wrapper and model ever built alive (ddp_from_scratch/replicas.py,
    held_weakly). torch's DDP is freed; so must ours be, each on-ramp step, the full DDP and ZeRO-2."""
    run(_freed_worker, 2, tmp_path, str(tmp_path / "res"), timeout_s=PG_TIMEOUT_S)
    for r in range(2):
        alive = torch.load(f"{tmp_path / 'res'}.rank{r}")
        assert alive == dict.fromkeys(alive, 0), (r, alive)
