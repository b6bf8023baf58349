"""ZeRO-1 (zero.py) and ZeRO-2 (zero2.py) train like DDP, like one process and like torch's ZeroRedundancyOptimizer.

Real processes (gloo, CPU), world sizes 2 and 3, a tiny 2-layer transformer language model with
its output head tied to the embedding and two frozen parameters, AdamW, STEPS steps; rank r takes
micro-batch r of each global batch.

What is compared, and why it holds on any CPU (tests/support/numerics.py derives the bounds):
- Bit for bit (torch.equal), both world sizes, where the arithmetic is the same: ZeRO-1 against
  DDP with a plain AdamW, against torch's ZeroRedundancyOptimizer (on the same DDP, so on the same
  averaged gradients), and after a resume; ZeRO-2 (ring, one bucket) against our DDP with the ring
  all-reduce and the same one bucket (its reduce-scatter is the first half of that all-reduce, on
  the same flat gradient cut the same way, and AdamW is elementwise); a resumed ZeRO-2 against an
  uninterrupted one. The same rank does the same arithmetic on the same numbers.
- 2 ranks, also bit for bit: everything else against DDP (torch's reduce-scatter, several small
  buckets, our ring all-reduce, torch's DDP under ZeRO-1): the average of two numbers has one
  addition, a + b == b + a, whatever the buckets or the collective.
- 3 ranks, in lockstep (support/sharded.py `lockstep`): those add the three gradients in another
  order, and AdamW amplifies that rounding (it divides by sqrt(v) + eps). So DDP trains, and at
  every step each of them is loaded with DDP's parameters and its averaged gradient must lie within
  n * eps * S of DDP's (S = sum over ranks of |g_r| / n), before DDP steps.
- Clipping (ZeRO-2's sharded norm against DDP's torch.nn.utils.clip_grad_norm_), both world sizes,
  in lockstep: the norms sum the squares in different orders, so the clipped gradients may differ
  by the bound `numerics.clip_bounds` derives (about 6e-4 of each element here).
- Against one process on the global batch, in float64, in lockstep: the single process trains,
  and DDP's and ZeRO-2's averaged gradients at its parameters must lie within 2^-30 of the largest
  per-sample gradient element (float64 rounding is about 2^-38 of it). ZeRO-1's gradients are
  DDP's and its step is AdamW's bit for bit (above), so it trains like one process too.
Each comparison also checks that it could fail: some gradient is 1000 (clipping: 100) times its bound.
"""

from __future__ import annotations

import copy

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
    LR,
    STEPS,
    Plain,
    Zero2,
    adamw,
    lockstep,
    make_model,
    one_process_terms,
    reordering_terms,
    train,
)
from support.spawn import run, world_sizes
from torch.distributed.optim import ZeroRedundancyOptimizer as TorchZero

import ddp_native
from ddp_from_scratch import DistributedDataParallel
from ddp_from_scratch.zero import ZeroRedundancyOptimizer, partition_parameters
from ddp_from_scratch.zero2 import Zero2Optimizer

CLIP = 0.2  # a global gradient norm below every step's here: clipping acts each step
SMALL_BUCKETS_MB = 2e-3  # ~2 KiB: several ZeRO-2 buckets, overlapped
ZERO2 = {  # ZeRO-2 cases: their collectives and bucket cap
    "zero2/ring": {"collectives": "ring", "bucket_cap_mb": 1e4},  # one bucket, as our DDP's here
    "zero2/torch": {"collectives": "torch", "bucket_cap_mb": 1e4},
    "zero2/ring-small-buckets": {"collectives": "ring", "bucket_cap_mb": SMALL_BUCKETS_MB},
}


def zero1(params, **kw):
    return ZeroRedundancyOptimizer(params, torch.optim.AdamW, lr=LR, **kw)


def ours_ddp(base, **kw):
    # one bucket, never rebuilt: the same layout, so the same sums, before and after a resume
    one_bucket = {"bucket_cap_mb": 1e4, "first_bucket_cap_mb": 1e4, "rebuild_buckets": False}
    return DistributedDataParallel(copy.deepcopy(base), **one_bucket, **kw)


def torch_ddp(base):
    return ddp_native.wrap(copy.deepcopy(base), torch.device("cpu"))


def zero2(base, **kw) -> Zero2:
    m = copy.deepcopy(base)  # not wrapped: the optimizer's hooks reduce-scatter the gradients
    return Zero2(m, Zero2Optimizer(m.parameters(), torch.optim.AdamW, lr=LR, **kw))


def _worker(rank, world_size, out_path):
    base = make_model()
    res = {}

    # DDP with a plain AdamW: the reference; on 3 ranks it leads the others in lockstep
    m = ours_ddp(base)
    baseline = adamw(m.parameters())
    followers = {}
    if world_size > 2:
        followers = {
            "ddp-ring": Plain(ours_ddp(base, all_reduce="ring")),
            "torch-ddp": Plain(torch_ddp(base)),
            **{case: zero2(base, **ZERO2[case]) for case in ("zero2/torch", "zero2/ring-small-buckets")},
        }
    terms = reordering_terms(base, world_size, rank) if world_size > 2 else None
    res["lockstep"] = lockstep(Plain(m), baseline, followers, world_size, rank, terms=terms)
    res["ddp"] = Plain(m).state()
    res["ddp-optim-state"] = baseline.state_dict()
    m = ours_ddp(base, all_reduce="ring")
    res["ddp-ring"] = train(m, adamw(m.parameters()), world_size, rank)
    m = ours_ddp(base)
    res["zero1/ours-ddp"] = train(m, zero1(m.parameters()), world_size, rank)
    m = ours_ddp(base, all_reduce="ring")
    opt = zero1(m.parameters(), collectives="ring", sync="broadcast")
    res["zero1/ours-ddp-ring-broadcast"] = train(m, opt, world_size, rank)
    m = torch_ddp(base)
    res["zero1/torch-ddp"] = train(m, zero1(m.parameters(), collectives="ring"), world_size, rank)
    m = ours_ddp(base)
    ref = TorchZero(m.parameters(), optimizer_class=torch.optim.AdamW, lr=LR)
    res["torch-zero/ours-ddp"] = train(m, ref, world_size, rank)
    m = torch_ddp(base)
    res["torch-zero/torch-ddp"] = train(
        m, TorchZero(m.parameters(), optimizer_class=torch.optim.AdamW, lr=LR), world_size, rank
    )

    # ZeRO-2 trained in full: one bucket with the ring (bit for bit on any world size), and on 2
    # ranks the others (bit for bit there; on 3 they follow DDP in lockstep above)
    for case in ZERO2 if world_size == 2 else ("zero2/ring", "zero2/ring-small-buckets"):
        z = zero2(base, **ZERO2[case])
        res[case] = train(z.model, z.opt, world_size, rank)
        res[f"{case}/buckets"] = len(z.opt.buckets)
        res[f"{case}/grad-numel"] = sum(b.shard.numel() for b in z.opt.buckets)

    # ZeRO-2 clipping by the global norm of the sharded gradients, against DDP's clipping, in lockstep
    m = ours_ddp(base)
    clipped = {"zero2/clip": zero2(base, **ZERO2["zero2/ring-small-buckets"])}
    res["clip-lockstep"] = lockstep(Plain(m), adamw(m.parameters()), clipped, world_size, rank, clip=CLIP, terms=terms)
    res["ddp/clip"] = Plain(m).state()

    # one process on the global batch, float64: it trains; DDP and ZeRO-2 follow (numerics.FLOAT64_RTOL)
    base64 = copy.deepcopy(base).double()
    single = Plain(copy.deepcopy(base64))
    followers = {  # torch's collectives: our ring takes float32 and 16-bit floats only
        "ddp": Plain(ours_ddp(base64)),
        "zero2/torch": zero2(base64, **ZERO2["zero2/torch"]),
        "zero2/torch-small-buckets": zero2(base64, collectives="torch", bucket_cap_mb=SMALL_BUCKETS_MB),
    }
    terms64 = one_process_terms(base64, rank)
    res["one-process"] = lockstep(
        single, adamw(single.model.parameters()), followers, world_size, rank, terms=terms64, one_process=True
    )

    # ZeRO-2 checkpoint: consolidate to rank 0, load the full state everywhere, train on
    z = zero2(base, **ZERO2["zero2/ring-small-buckets"])
    m, opt = z.model, z.opt
    train(m, opt, world_size, rank, steps=4)
    opt.consolidate_state_dict(to=0)
    full = [opt.state_dict() if rank == 0 else None]
    torch.distributed.broadcast_object_list(full, src=0)
    res["zero2-state"] = full[0]
    m2 = copy.deepcopy(base)
    m2.load_state_dict(m.state_dict())
    opt2 = Zero2Optimizer(m2.parameters(), torch.optim.AdamW, lr=LR, **ZERO2["zero2/ring-small-buckets"])
    opt2.load_state_dict(full[0])
    res["zero2-resumed"] = train(m2, opt2, world_size, rank, steps=STEPS - 4, skip=4)

    # checkpoint: consolidate on rank 0, load the full state on every rank of fresh optimizers, train on
    m = ours_ddp(base)
    opt = zero1(m.parameters(), collectives="ring")
    train(m, opt, world_size, rank, steps=4)
    opt.consolidate_state_dict(to=0)
    res["zero1-state"] = opt.state_dict() if rank == 0 else None
    full = [opt.state_dict() if rank == 0 else None]
    torch.distributed.broadcast_object_list(full, src=0)
    m2 = ours_ddp(base)
    m2.module.load_state_dict(m.module.state_dict())
    opt2 = zero1(m2.parameters(), sync="broadcast")
    opt2.load_state_dict(full[0])
    res["zero1-resumed"] = train(m2, opt2, world_size, rank, steps=STEPS - 4, skip=4)
    res["n-state"] = len(opt2.optim.state)
    res["errors"] = []  # bad calls raise clear errors, on every rank alike
    for call in (opt2.state_dict, lambda: opt2.load_state_dict({"state": {}, "param_groups": []})):
        try:
            call()
        except (RuntimeError, ValueError) as e:
            res["errors"].append((type(e).__name__, str(e)))
    torch.save(res, f"{out_path}.rank{rank}")


def assert_equal(got: dict, want: dict, where) -> None:
    for k, ref in want.items():
        assert torch.equal(got[k], ref), (where, k, float((got[k] - ref).abs().max()))


@pytest.mark.parametrize("world_size", world_sizes(2, 3))
def test_zero_equals_ddp_torch_and_one_process(tmp_path, world_size):
    out = tmp_path / "res"
    run(_worker, world_size, tmp_path, str(out))
    per_rank = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(world_size)]
    start = make_model().state_dict()
    trainable = [p for p in make_model().parameters() if p.requires_grad]
    exact = ["zero1/ours-ddp", "zero1/ours-ddp-ring-broadcast", "torch-zero/ours-ddp", "zero1-resumed", "zero2/ring"]
    for r, res in enumerate(per_rank):
        for case in exact:  # the same arithmetic on any world size
            assert_equal(res[case], res["ddp-ring" if "ring" in case else "ddp"], (case, r))
        assert_equal(res["zero1/torch-ddp"], res["torch-zero/torch-ddp"], ("torch ddp", r))
        assert_equal(res["zero1/torch-ddp"], per_rank[0]["zero1/torch-ddp"], ("replicas diverged", r))
        assert_equal(res["zero2-resumed"], res["zero2/ring-small-buckets"], ("zero2 resumed", r))
        if world_size == 2:  # one addition per element: bit for bit whatever the buckets and collectives
            for case in ("ddp-ring", "zero1/torch-ddp", "zero2/torch", "zero2/ring-small-buckets"):
                assert_equal(res[case], res["ddp"], (case, r))
        else:  # another order of three terms: DDP leads, each follows at its parameters
            for step, record in enumerate(res["lockstep"]):
                bounds = {k: reordering_bound(s, world_size, torch.float32) for k, s in record["S"].items()}
                assert_can_fail(record["leader"], bounds, ("lockstep", step))
                for case in ("ddp-ring", "torch-ddp", "zero2/torch", "zero2/ring-small-buckets"):
                    assert_reordered(record[case], record["leader"], record["S"], world_size, (case, r, step))
                    assert_equal(record[case], per_rank[0]["lockstep"][step][case], ("replicas diverged", case, r))
        for step, record in enumerate(res["clip-lockstep"]):  # the norms sum in different orders
            reorder = None
            if world_size > 2:
                reorder = {k: reordering_bound(s, world_size, torch.float32) for k, s in record["S"].items()}
            bounds = clip_bounds(record["leader"], record["norm"], CLIP, reorder, world_size)
            assert_can_fail(record["leader"], bounds, ("clip", step), room=100)
            assert_within(record["zero2/clip"], record["leader"], bounds, ("zero2 clip", r, step))
            assert_equal(record["zero2/clip"], per_rank[0]["clip-lockstep"][step]["zero2/clip"], ("replicas", r))
        assert res["zero2/ring/buckets"] == 1 and res["zero2/ring-small-buckets/buckets"] > 3
        n_trainable = sum(p.numel() for p in trainable)
        assert res["zero2/ring/grad-numel"] <= n_trainable / world_size + 1  # each rank keeps 1/n of the gradient
        (kind1, msg1), (kind2, msg2) = res["errors"]
        assert kind1 == "RuntimeError" and "consolidate_state_dict" in msg1, msg1
        assert kind2 == "ValueError" and "parameter groups" in msg2, msg2
        # each rank held optimizer state for its shard only
        assert 0 < res["n-state"] < len(trainable)
    # one process, float64: DDP's and ZeRO-2's averaged gradients at the single process's parameters
    for step, record in enumerate(per_rank[0]["one-process"]):
        bounds = float64_bounds(record["S"])
        assert_can_fail(record["leader"], bounds, ("one process", step))
        for case in ("ddp", "zero2/torch", "zero2/torch-small-buckets"):
            assert_within(record[case], record["leader"], bounds, ("one process", case, world_size, step))
    ddp = per_rank[0]["ddp"]
    clipping = max((per_rank[0]["ddp/clip"][k] - ddp[k]).abs().max().item() for k in ddp)
    assert clipping > 1e-3, "clipping must change the result, or the clip comparison proves nothing"
    # the consolidated state dict is plain AdamW's (DDP's optimizer is one), element for element
    ours, plain = per_rank[0]["zero1-state"], per_rank[0]["ddp-optim-state"]
    assert ours["param_groups"] == plain["param_groups"]
    assert sorted(ours["state"]) == sorted(plain["state"])
    ddp_state = plain["state"]
    zero2_state = per_rank[0]["zero2-state"]
    assert zero2_state["param_groups"] == ours["param_groups"]
    assert sorted(zero2_state["state"]) == sorted(ours["state"])
    for i, s in [*ours["state"].items(), *zero2_state["state"].items()]:
        for k, v in s.items():
            assert v.shape == ddp_state[i][k].shape and v.dtype == ddp_state[i][k].dtype, (i, k)
    # the test can fail: training moved the weights, so equal weights say something
    assert max((ddp[k] - start[k]).abs().max().item() for k in ddp) > 1e-2


def test_partition_is_torchs():
    model = make_model()
    groups = [{"params": list(model.parameters())}]
    opt = TorchZero.__new__(TorchZero)  # only the partition: no process group needed
    for n in (2, 3):
        opt.world_size, opt._partition_parameters_cache, opt.param_groups = n, [], [dict(g) for g in groups]
        opt._param_to_rank_cache = {}
        theirs = [[[id(p) for p in g["params"]] for g in rank] for rank in opt._partition_parameters()]
        ours = [[[id(p) for p in g] for g in rank] for rank in partition_parameters(groups, n)]
        assert ours == theirs


def _debug_worker(rank, world_size, out_path):
    import io
    import os
    import re
    import sys

    from ddp_from_scratch import debug

    os.environ[debug.ENV] = "1"  # read when each wrapper is built
    try:
        m1 = DistributedDataParallel(make_model())
        o1 = zero1(m1.parameters())
        m2 = make_model()
        o2 = Zero2Optimizer(m2.parameters(), torch.optim.AdamW, lr=LR, bucket_cap_mb=0.004)  # several buckets
    finally:
        os.environ[debug.ENV] = "0"
    lines = {}
    for name, m, o in (("zero1", m1, o1), ("zero2", m2, o2)):
        captured, sys.stderr = sys.stderr, io.StringIO()
        try:
            train(m, o, world_size, rank, steps=1)
        finally:
            captured, sys.stderr = sys.stderr.getvalue(), captured
        fields = r"rank=(?P<rank>\d+) op=(?P<op>.+?) bucket=(?P<bucket>\S+) bytes=(?P<bytes>\d+)"
        lines[name] = [m.groupdict() for m in re.finditer(fields, captured)]
    lines["buckets"] = [(b.index, b.numel_padded * 4) for b in o2.buckets]
    torch.save(lines, f"{out_path}.rank{rank}")


def test_debug_log_names_each_all_gather_and_reduce_scatter_with_its_bucket(tmp_path):
    # DDP_FROM_SCRATCH_DEBUG=1: ZeRO-1's parameter all-gather, ZeRO-2's reduce-scatter and all-gather
    # of each bucket, one line each with the bytes it carried (fsdp: test_fsdp.py names its units)
    run(_debug_worker, 2, tmp_path, str(tmp_path / "log"))
    for r in range(2):
        got = torch.load(f"{tmp_path / 'log'}.rank{r}")
        zero1_ops = [x["op"] for x in got["zero1"] if "zero-1" in x["op"]]
        assert zero1_ops == ["all_gather/torch(zero-1 params)"], got["zero1"]
        buckets = got["buckets"]
        assert len(buckets) > 1
        for op in ("reduce_scatter/torch(zero-2)", "all_gather/torch(zero-2 params)"):
            mine = [(int(x["bucket"]), int(x["bytes"])) for x in got["zero2"] if x["op"] == op]
            assert sorted(mine) == buckets, (op, mine, buckets)
            assert all(x["rank"] == str(r) for x in got["zero2"])
