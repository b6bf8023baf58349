"""Our FSDP (fsdp.py) trains like one process and like torch's FSDP2 (`fully_shard`), fp32 and bf16.

Real processes (gloo, CPU), world sizes 2 and 3, the tiny 2-layer transformer of support/sharded.py
(head tied to the embedding, a frozen parameter in the root unit and one in a layer), AdamW,
STEPS = 10 steps, units = the two layers + the root, as `fully_shard` is applied to torch's copy.

What is compared, and why it holds on any CPU (tests/support/numerics.py derives the bounds):
- 2 ranks, ours against torch's fully_shard, fp32 and bf16 compute with fp32 reduce: the final
  weights bit for bit. Both gather the same values (bf16: the same casts of the same fp32 master
  weights), so each rank computes the same gradient with the same kernels, and the average of
  two numbers has one addition (a + b == b + a); AdamW then does the same per-element arithmetic.
- 3 ranks, in lockstep (support/sharded.py `lockstep`), fp32 and bf16: gloo's reduce-scatter and
  our ring add the three gradients in different orders, and AdamW amplifies that rounding. So
  torch's fully_shard trains, and at every step ours is loaded with its parameters and our averaged
  gradient must lie within n * eps(float32) * S of torch's (S = sum over ranks of |g_r| / n, read
  from the gradients each rank hands to our reduce-scatters: `ReduceScatterTerms`), before torch
  steps. (bf16 gradients have 8 significant bits, but a sum of three of them is exact in fp32 only
  while their exponents lie within 16 binades of each other: not something to rely on.)
- Clipping (our sharded norm against torch's clip_grad_norm_ on DTensors), both world sizes, in
  lockstep: the norms sum the squares in different orders: `numerics.clip_bounds`.
- Against one process on the global batch, in float64, in lockstep: the single process trains,
  and our averaged gradients at its parameters (torch's collectives: our ring takes float32 and
  16-bit floats only) must lie within 2^-30 of the largest per-sample gradient element (float64
  rounding is about 2^-38 of it).
- The full state dict: the unwrapped model's keys in the same order, dtypes and shapes, the same on
  every rank; loading a state dict and reading it back is exact.
Each comparison also checks that it could fail: some gradient is 1000 (clipping: 100) times its bound.
"""

from __future__ import annotations

import copy
import io
import os
import sys

import pytest
import torch
from support.numerics import (
    assert_can_fail,
    assert_reordered,
    assert_within,
    clip_bounds,
    float64_bounds,
    reordering_bound,
)
from support.sharded import (
    OursFSDP,
    Plain,
    ReduceScatterTerms,
    TorchFSDP,
    adamw,
    lockstep,
    make_model,
    one_process_terms,
    train,
)
from support.spawn import run, world_sizes

import ddp_native.sharded
from ddp_from_scratch import debug
from ddp_from_scratch.fsdp import FullyShardedDataParallel, default_units

CLIP = 0.2  # below the gradient norm of every step here, so clipping acts each step
BF16 = {"compute_dtype": torch.bfloat16, "reduce_dtype": torch.float32}
OURS = {"ours": {}, "ours/ring-no-prefetch": {"collectives": "ring", "prefetch": False}, "ours/bf16": BF16}
LEADS = {"torch": ({}, ("ours", "ours/ring-no-prefetch")), "torch/bf16": (BF16, ("ours/bf16",))}


def ours(base, name: str) -> FullyShardedDataParallel:
    return FullyShardedDataParallel(copy.deepcopy(base), **OURS[name])


def torchs(base, **kw):
    """torch's FSDP2 on a copy of `base`, on the units ours picks (each transformer layer), then the root."""
    model = copy.deepcopy(base)
    return ddp_native.sharded.fsdp(model, default_units(model), **kw)


def _worker(rank, world_size, out_path):
    base = make_model()
    res = {}
    if world_size == 2:  # every implementation trains in full: compared bit for bit
        for name in OURS:
            model = ours(base, name)
            train(model, adamw(model.parameters()), world_size, rank)
            res[name] = model.full_state_dict()
            res[f"{name}/shard-numel"] = sum(p.numel() for p in model.parameters())
        for name, (kw, _) in LEADS.items():
            model = torchs(base, **kw)
            train(model, adamw(model.parameters()), world_size, rank)
            res[name] = ddp_native.sharded.full_state_dict(model)
    else:  # torch's trains; ours follow it in lockstep
        for lead, (kw, names) in LEADS.items():
            leader = TorchFSDP(torchs(base, **kw))
            followers = {n: OursFSDP(ours(base, n)) for n in names}
            terms = ReduceScatterTerms(followers[names[0]].model).terms
            opt = adamw(leader.model.parameters())
            res[f"lockstep/{lead}"] = lockstep(leader, opt, followers, world_size, rank, terms=terms)
            res[lead] = leader.state()
            for n, f in followers.items():
                res[n] = f.state()
                res[f"{n}/shard-numel"] = sum(p.numel() for p in f.model.parameters())
    # gradient clipping by the global norm of sharded gradients (the harness clips every step), in lockstep
    leader = TorchFSDP(torchs(base))
    follower = OursFSDP(ours(base, "ours"))
    terms = ReduceScatterTerms(follower.model).terms if world_size > 2 else None
    opt = adamw(leader.model.parameters())
    res["clip-lockstep"] = lockstep(leader, opt, {"ours/clip": follower}, world_size, rank, clip=CLIP, terms=terms)
    res["torch/clip"] = leader.state()
    # one process on the global batch, float64: it trains; ours (prefetching or not) follow
    base64 = copy.deepcopy(base).double()
    single = Plain(copy.deepcopy(base64))
    followers = {  # torch's collectives: our ring takes float32 and 16-bit floats only
        "ours": OursFSDP(ours(base64, "ours")),
        "ours/no-prefetch": OursFSDP(FullyShardedDataParallel(copy.deepcopy(base64), prefetch=False)),
    }
    terms = one_process_terms(base64, rank)
    opt = adamw(single.model.parameters())
    res["one-process"] = lockstep(single, opt, followers, world_size, rank, terms=terms, one_process=True)
    # DDP_FROM_SCRATCH_DEBUG=1: one line per all-gather and reduce-scatter, naming its unit
    os.environ[debug.ENV] = "1"
    model = FullyShardedDataParallel(copy.deepcopy(base), collectives="ring")
    os.environ[debug.ENV] = "0"
    captured, sys.stderr = sys.stderr, io.StringIO()
    try:
        train(model, adamw(model.parameters()), world_size, rank, steps=2)
    finally:
        captured, sys.stderr = sys.stderr.getvalue(), captured
    res["debug"] = [line.split(" op=")[1].split(" ")[0] for line in captured.splitlines() if " op=" in line]
    # a full state dict loads into a fresh wrapper and reads back unchanged
    fresh = FullyShardedDataParallel(copy.deepcopy(base))
    fresh.load_full_state_dict(res["ours"])
    res["reloaded"] = fresh.full_state_dict()
    # a weight shared by two units is refused on every rank, with what to do
    bad = copy.deepcopy(base)
    bad.layers[1].proj.weight = bad.layers[0].proj.weight
    try:
        FullyShardedDataParallel(bad)
    except ValueError as e:
        res["shared-error"] = str(e)
    torch.save(res, f"{out_path}.rank{rank}")


def assert_equal(got: dict, want: dict, where) -> None:
    for k, ref in want.items():
        assert torch.equal(got[k], ref), (where, k, float((got[k] - ref).abs().max()))


def reordering_bounds(record: dict, world_size: int) -> dict:
    return {k: reordering_bound(s, world_size, torch.float32) for k, s in record["S"].items()}


@pytest.mark.parametrize("world_size", world_sizes(2, 3))
def test_fsdp_equals_one_process_and_torch_fully_shard(tmp_path, world_size):
    out = tmp_path / "res"
    run(_worker, world_size, tmp_path, str(out))
    per_rank = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(world_size)]
    single_model = make_model()
    start = single_model.state_dict()
    n_trainable = sum(p.numel() for p in single_model.parameters() if p.requires_grad)
    for r, res in enumerate(per_rank):
        assert list(res["ours"]) == list(start), "full state dict keys/order differ from the unwrapped model's"
        for case in OURS:
            for k, ref in start.items():
                assert res[case][k].dtype == ref.dtype and res[case][k].shape == ref.shape, (case, k)
            assert_equal(res[case], per_rank[0][case], ("ranks disagree on the full state dict", case, r))
        assert_equal(res["reloaded"], res["ours"], ("reloaded", r))
        if world_size == 2:  # one addition per element: bit for bit, fp32 and bf16
            for lead, (_, cases) in LEADS.items():
                for case in cases:
                    assert_equal(res[case], res[lead], (case, r))
        else:  # another order of three terms: torch leads, ours follow at its parameters
            for lead, (_, cases) in LEADS.items():
                for step, record in enumerate(res[f"lockstep/{lead}"]):
                    assert_can_fail(record["leader"], reordering_bounds(record, world_size), (lead, step))
                    for case in cases:
                        assert_reordered(record[case], record["leader"], record["S"], world_size, (case, r, step))
                        rank0 = per_rank[0][f"lockstep/{lead}"][step][case]
                        assert_equal(record[case], rank0, ("replicas diverged", case, r, step))
        for step, record in enumerate(res["clip-lockstep"]):  # the norms sum in different orders
            reorder = reordering_bounds(record, world_size) if world_size > 2 else None
            bounds = clip_bounds(record["leader"], record["norm"], CLIP, reorder, world_size)
            assert_can_fail(record["leader"], bounds, ("clip", step), room=100)
            assert_within(record["ours/clip"], record["leader"], bounds, ("clip", r, step))
        assert "shared by units 'layers.0' and 'layers.1'" in res["shared-error"], res.get("shared-error")
        # per step: each unit gathered for forward and again for backward, its gradient reduce-scattered
        units = ["root", "layers.0", "layers.1"]
        for u in units:
            assert res["debug"].count(f"all_gather/ring(unit={u})") == 4, (u, res["debug"])
            assert res["debug"].count(f"reduce_scatter/ring(unit={u})") == 2, (u, res["debug"])
        assert len(res["debug"]) == 2 * 3 * len(units)
        # each rank optimises 1/n of the trainable elements (padded to a multiple of n per unit)
        assert n_trainable / world_size <= res["ours/shard-numel"] < n_trainable / world_size + 3
    # one process, float64: our averaged gradients at the single process's parameters, every step
    for step, record in enumerate(per_rank[0]["one-process"]):
        bounds = float64_bounds(record["S"])
        assert_can_fail(record["leader"], bounds, ("one process", step))
        for case in ("ours", "ours/no-prefetch"):
            assert_within(record[case], record["leader"], bounds, ("one process", case, world_size, step))
    # the test can fail: training moved the weights, and clipping and bf16 changed them
    fp32 = per_rank[0]["torch"]
    moved = max((fp32[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-2, moved
    clipping = max((per_rank[0]["torch/clip"][k] - fp32[k]).abs().max().item() for k in start)
    assert clipping > 1e-3, "clipping must change the result, or the clip test proves nothing"
    bf16_vs_fp32 = max((per_rank[0]["torch/bf16"][k] - fp32[k]).abs().max().item() for k in start)
    assert bf16_vs_fp32 > 1e-4, "bf16 compute must differ from fp32 (else it ran in fp32)"
