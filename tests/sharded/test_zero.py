"""ZeRO-1 (zero.py) and ZeRO-2 (zero2.py) train like DDP, like one process and like torch's ZeroRedundancyOptimizer.

Real processes (gloo, CPU), world sizes 2 and 3, a tiny 2-layer transformer language model with
its output head tied to the embedding and two frozen parameters, AdamW, STEPS steps; rank r takes
micro-batch r of each global batch.

Tolerances, and why:
- ZeRO-1 against DDP with a plain AdamW, against torch's ZeroRedundancyOptimizer (on the same DDP,
  so on the same averaged gradients), and its consolidated state dict against plain AdamW's:
  bit-identical (torch.equal). The same rank does the same per-parameter AdamW arithmetic on the
  same gradient; the all-gather or broadcast only copies the result.
- ZeRO-2 (ring, one bucket) against our DDP with the ring all-reduce and the same one bucket:
  bit-identical. Its reduce-scatter is the first half of that all-reduce, on the same flat
  gradient cut the same way (`tensor_split`), so every element is summed in the same order; and
  AdamW is elementwise, so stepping a flat chunk gives each element the same result.
- ZeRO-2 with torch's reduce-scatter, or with several small buckets, against DDP: bit-identical
  on 2 ranks (a sum of two numbers has one rounding), atol 1e-6 on 3 ranks, where gloo's
  reduce-scatter or another cut of the buckets adds the three gradients in another order
  (float32 ulps, ~1e-7, lifted by AdamW's division by sqrt(v)).
- Against one process on the global batch: atol 1e-4 after STEPS AdamW steps. DDP averages
  per-rank mean gradients, one process takes one mean over the global batch: the same number up
  to float32 rounding (~1e-7 relative), which AdamW's division by sqrt(v) amplifies where a
  gradient is near zero (tests/ddp/test_ddp_equivalence.py allows 2e-5 after 3 steps).
"""

from __future__ import annotations

import copy

import pytest
import torch
from support.sharded import LR, STEPS, adamw, make_model, train
from support.spawn import run
from torch.distributed.optim import ZeroRedundancyOptimizer as TorchZero

import ddp_native
from ddp_from_scratch import DistributedDataParallel
from ddp_from_scratch.zero import ZeroRedundancyOptimizer, partition_parameters
from ddp_from_scratch.zero2 import Zero2Optimizer

CLIP = 0.2  # a global gradient norm below every step's here: clipping acts each step


def zero1(params, **kw):
    return ZeroRedundancyOptimizer(params, torch.optim.AdamW, lr=LR, **kw)


def _worker(rank, world_size, out_path):
    base = make_model()
    res = {}

    def ours_ddp(**kw):
        # one bucket, never rebuilt: the same layout, so the same sums, before and after a resume
        one_bucket = {"bucket_cap_mb": 1e4, "first_bucket_cap_mb": 1e4, "rebuild_buckets": False}
        return DistributedDataParallel(copy.deepcopy(base), **one_bucket, **kw)

    def torch_ddp():
        return ddp_native.wrap(copy.deepcopy(base), torch.device("cpu"))

    m = ours_ddp()
    baseline = adamw(m.parameters())
    res["ddp"] = train(m, baseline, world_size, rank)
    res["ddp-optim-state"] = baseline.state_dict()
    m = ours_ddp(all_reduce="ring")
    res["ddp-ring"] = train(m, adamw(m.parameters()), world_size, rank)
    m = ours_ddp()
    res["zero1/ours-ddp"] = train(m, zero1(m.parameters()), world_size, rank)
    m = ours_ddp(all_reduce="ring")
    opt = zero1(m.parameters(), collectives="ring", sync="broadcast")
    res["zero1/ours-ddp-ring-broadcast"] = train(m, opt, world_size, rank)
    m = torch_ddp()
    res["zero1/torch-ddp"] = train(m, zero1(m.parameters(), collectives="ring"), world_size, rank)
    m = ours_ddp()
    ref = TorchZero(m.parameters(), optimizer_class=torch.optim.AdamW, lr=LR)
    res["torch-zero/ours-ddp"] = train(m, ref, world_size, rank)
    m = torch_ddp()
    res["torch-zero/torch-ddp"] = train(
        m, TorchZero(m.parameters(), optimizer_class=torch.optim.AdamW, lr=LR), world_size, rank
    )

    # ZeRO-2: the model is not wrapped (the optimizer's hooks reduce-scatter the gradients)
    for case, kw in {
        "zero2/ring": {"collectives": "ring", "bucket_cap_mb": 1e4},  # one bucket, as our DDP's here
        "zero2/torch": {"collectives": "torch", "bucket_cap_mb": 1e4},
        "zero2/ring-small-buckets": {"collectives": "ring", "bucket_cap_mb": 2e-3},  # ~2 KiB: several, overlapped
    }.items():
        m = copy.deepcopy(base)
        opt = Zero2Optimizer(m.parameters(), torch.optim.AdamW, lr=LR, **kw)
        res[case] = train(m, opt, world_size, rank)
        res[f"{case}/buckets"] = len(opt.buckets)
        res[f"{case}/grad-numel"] = sum(b.shard.numel() for b in opt.buckets)

    # ZeRO-2 clipping by the global norm of the sharded gradients, against DDP's clipping
    m = copy.deepcopy(base)
    opt = Zero2Optimizer(m.parameters(), torch.optim.AdamW, lr=LR, collectives="ring", bucket_cap_mb=2e-3)
    res["zero2/clip"] = train(m, opt, world_size, rank, clip=CLIP)
    m = ours_ddp()
    res["ddp/clip"] = train(m, adamw(m.parameters()), world_size, rank, clip=CLIP)

    # ZeRO-2 checkpoint: consolidate to rank 0, load the full state everywhere, train on
    m = copy.deepcopy(base)
    opt = Zero2Optimizer(m.parameters(), torch.optim.AdamW, lr=LR, collectives="ring", bucket_cap_mb=2e-3)
    train(m, opt, world_size, rank, steps=4)
    opt.consolidate_state_dict(to=0)
    full = [opt.state_dict() if rank == 0 else None]
    torch.distributed.broadcast_object_list(full, src=0)
    res["zero2-state"] = full[0]
    m2 = copy.deepcopy(base)
    m2.load_state_dict(m.state_dict())
    opt2 = Zero2Optimizer(m2.parameters(), torch.optim.AdamW, lr=LR, collectives="ring", bucket_cap_mb=2e-3)
    opt2.load_state_dict(full[0])
    res["zero2-resumed"] = train(m2, opt2, world_size, rank, steps=STEPS - 4, skip=4)

    # checkpoint: consolidate on rank 0, load the full state on every rank of fresh optimizers, train on
    m = ours_ddp()
    opt = zero1(m.parameters(), collectives="ring")
    train(m, opt, world_size, rank, steps=4)
    opt.consolidate_state_dict(to=0)
    res["zero1-state"] = opt.state_dict() if rank == 0 else None
    full = [opt.state_dict() if rank == 0 else None]
    torch.distributed.broadcast_object_list(full, src=0)
    m2 = ours_ddp()
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


@pytest.mark.parametrize("world_size", [2, 3])
def test_zero_equals_ddp_torch_and_one_process(tmp_path, world_size):
    out = tmp_path / "res"
    run(_worker, world_size, tmp_path, str(out))
    per_rank = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(world_size)]
    single_model = make_model()
    single_opt = adamw(single_model.parameters())
    single = train(single_model, single_opt, world_size, None)
    start = make_model().state_dict()
    exact = ["zero1/ours-ddp", "zero1/ours-ddp-ring-broadcast", "torch-zero/ours-ddp", "zero1-resumed", "zero2/ring"]
    for r, res in enumerate(per_rank):
        for name in res["ddp"]:
            for case in exact:
                ref = res["ddp-ring" if "ring" in case else "ddp"][name]  # on 3 ranks the sums' order differs
                assert torch.equal(res[case][name], ref), (case, r, name, (res[case][name] - ref).abs().max())
            got = res["zero1/torch-ddp"][name]
            assert torch.equal(got, res["torch-zero/torch-ddp"][name]), ("torch ddp", r, name)
            assert torch.equal(got, per_rank[0]["zero1/torch-ddp"][name]), "replicas diverged"
            diff = (res["zero2/clip"][name] - res["ddp/clip"][name]).abs().max().item()
            assert diff <= 1e-6, ("zero2 clip", r, name, diff)  # the norm's sum runs in another order
            got, want = res["zero2-resumed"][name], res["zero2/ring-small-buckets"][name]
            assert torch.equal(got, want), ("zero2 resumed", r, name, (got - want).abs().max())
            for case in ("zero2/torch", "zero2/ring-small-buckets"):  # other sums' orders on 3 ranks
                diff = (res[case][name] - res["ddp"][name]).abs().max().item()
                assert diff <= (0 if world_size == 2 else 1e-6), (case, r, name, diff)
            for case in [*exact, "zero1/torch-ddp", "zero2/torch", "zero2/ring-small-buckets"]:
                assert torch.allclose(res[case][name], single[name], rtol=0, atol=1e-4), (
                    case,
                    r,
                    name,
                    (res[case][name] - single[name]).abs().max(),
                )
        assert res["zero2/ring/buckets"] == 1 and res["zero2/ring-small-buckets/buckets"] > 3
        n_trainable = sum(p.numel() for p in single_model.parameters() if p.requires_grad)
        assert res["zero2/ring/grad-numel"] <= n_trainable / world_size + 1  # each rank keeps 1/n of the gradient
        (kind1, msg1), (kind2, msg2) = res["errors"]
        assert kind1 == "RuntimeError" and "consolidate_state_dict" in msg1, msg1
        assert kind2 == "ValueError" and "parameter groups" in msg2, msg2
        # each rank held optimizer state for its shard only
        assert 0 < res["n-state"] < len([p for p in single_model.parameters() if p.requires_grad])
    clipping = max((per_rank[0]["ddp/clip"][k] - per_rank[0]["ddp"][k]).abs().max().item() for k in single)
    assert clipping > 1e-3, "clipping must change the result, or the clip comparison proves nothing"
    # the consolidated state dict is plain AdamW's, element for element
    ours, plain = per_rank[0]["zero1-state"], single_opt.state_dict()
    assert ours["param_groups"] == per_rank[0]["ddp-optim-state"]["param_groups"]
    assert sorted(ours["state"]) == sorted(plain["state"])
    ddp_state = per_rank[0]["ddp-optim-state"]["state"]
    zero2 = per_rank[0]["zero2-state"]
    assert zero2["param_groups"] == ours["param_groups"] and sorted(zero2["state"]) == sorted(ours["state"])
    for i, s in [*ours["state"].items(), *zero2["state"].items()]:
        for k, v in s.items():
            assert v.shape == ddp_state[i][k].shape and v.dtype == ddp_state[i][k].dtype, (i, k)
    # the test can fail: training moved the weights well beyond the tolerance
    assert max((single[k] - start[k]).abs().max().item() for k in single) > 1e-2


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
