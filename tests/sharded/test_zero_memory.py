"""Per-rank memory of DDP, ZeRO-1, ZeRO-2 and FSDP matches the ZeRO paper's formula.

Rajbhandari et al., SC 2020, §5 (fp32 weights, AdamW: K = 8 bytes of optimizer state per
parameter; Psi = number of parameters, n = ranks), bytes per rank:

    stage              parameters   gradients   optimizer state   total
    DDP                4 Psi        4 Psi       8 Psi             16 Psi
    ZeRO-1 (P_os)      4 Psi        4 Psi       8 Psi / n         8 Psi + 8 Psi / n
    ZeRO-2 (P_os+g)    4 Psi        4 Psi / n   8 Psi / n         4 Psi + 12 Psi / n
    FSDP (P_os+g+p)    4 Psi / n    4 Psi / n   8 Psi / n         16 Psi / n

Measured from tensor storage after an optimizer step, before `zero_grad`, so gradients are
still held: every distinct storage behind the parameters the rank holds (the model's, or FSDP's
shards), behind their `.grad`, and behind the optimizer's state, each counted once (a tied
weight once; DDP's gradients are views of its buckets, `gradient_as_bucket_view=True`, as the
paper assumes one gradient copy). Each category must be within 10% of the formula, on every rank,
and the total lower than DDP's by the predicted factor within 10%. What makes up the difference:
AdamW's `step` counters (4 bytes per tensor), padding of flat tensors to a multiple of n, and
ZeRO-1's whole-parameter partition, which cannot split the state exactly in n.
The byte counter is the memory bench part's (experiments/bench/memory.py), the formula the strategy
table's (experiments/parallel.py, `Strategy.predicted`); that part measures the same for minilm-l6 and
distilbert, with torch's implementations beside ours.
The model is support/sharded.py's tiny transformer, with every parameter trainable (the formula has
no frozen ones); the tied weight is one parameter.
"""

from __future__ import annotations

import copy

import pytest
import torch
from support.sharded import LR, adamw, make_model, train
from support.spawn import run, world_sizes

from ddp_from_scratch import DistributedDataParallel
from ddp_from_scratch.fsdp import FullyShardedDataParallel
from ddp_from_scratch.zero import ZeroRedundancyOptimizer
from ddp_from_scratch.zero2 import Zero2Optimizer
from experiments import parallel
from experiments.bench.memory import held_bytes as measure
from experiments.bench.memory import storage_bytes


def all_trainable():
    model = make_model()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _worker(rank, world_size, out_path):
    base = all_trainable()
    res = {}
    m = DistributedDataParallel(copy.deepcopy(base), gradient_as_bucket_view=True)
    opt = adamw(m.parameters())
    train(m, opt, world_size, rank, steps=1, keep_grads=True)
    res["ddp"] = measure(m.module.parameters(), opt.state)
    m = DistributedDataParallel(copy.deepcopy(base), gradient_as_bucket_view=True)
    opt = ZeroRedundancyOptimizer(m.parameters(), torch.optim.AdamW, lr=LR)
    train(m, opt, world_size, rank, steps=1, keep_grads=True)
    res["zero1"] = measure(m.module.parameters(), opt.optim.state)
    m = copy.deepcopy(base)
    opt = Zero2Optimizer(m.parameters(), torch.optim.AdamW, lr=LR)
    train(m, opt, world_size, rank, steps=1, keep_grads=True)
    res["zero2"] = measure([*m.parameters(), *opt.optim.param_groups[0]["params"]], opt.optim.state)
    res["zero2"]["params"] = storage_bytes(m.parameters())  # the shards are views of these: no extra bytes
    m = FullyShardedDataParallel(copy.deepcopy(base))
    opt = adamw(m.parameters())
    train(m, opt, world_size, rank, steps=1, keep_grads=True)
    held = [*m.parameters(), *(t for mod in m.module.modules() for t in vars(mod).values() if torch.is_tensor(t))]
    res["fsdp"] = measure(held, opt.state)
    torch.save(res, f"{out_path}.rank{rank}")


@pytest.mark.parametrize("world_size", world_sizes(2, 3))
def test_memory_per_rank_matches_the_zero_formula(tmp_path, world_size):
    out = tmp_path / "mem"
    run(_worker, world_size, tmp_path, str(out))
    psi = sum(p.numel() for p in all_trainable().parameters())
    for r in range(world_size):
        res = torch.load(f"{out}.rank{r}")
        ddp_total = sum(res["ddp"].values())
        for stage, got in res.items():
            want = parallel.lookup(stage, parallel.OURS.name).predicted(psi, world_size)  # the table's formula
            for kind, value in got.items():
                assert abs(value - want[kind]) <= 0.1 * want[kind], (stage, kind, r, value, want[kind])
            factor = sum(want.values()) / (16 * psi)  # predicted total / DDP's
            measured = sum(got.values()) / ddp_total
            assert abs(measured - factor) <= 0.1 * factor, (stage, r, measured, factor)
        assert sum(res["fsdp"].values()) < sum(res["zero2"].values()) < sum(res["zero1"].values()) < ddp_total
