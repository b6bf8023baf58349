"""Sparse embedding gradients (ddp_from_scratch/sparse.py) give what the dense all-reduce gives.

Real processes (gloo, CPU), 2, 3 and 4 ranks. Each case runs torch's DDP and ours (sparse
exchange on, both collectives) on the same seeded model and batches and compares gradients:
bit for bit on 2 ranks, and on 3 and 4 within the bound of reordering n float32 terms,
(n-1) * 2^-24 * sum_r |g_r / n| per element (sparse.py says why). Cases: the sparse path, the
dense fallback (too many rows touched), a tied embedding, gradient accumulation under no_sync,
gradients not zeroed between steps, join with uneven inputs, and a short AdamW training run
whose final weights must equal torch's DDP's bit for bit on 2 ranks.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from support.spawn import run, world_sizes

import ddp_native
from ddp_from_scratch import DistributedDataParallel
from ddp_from_scratch.sparse import sparse_embedding_weights

V, D, T, B = 3000, 8, 6, 4  # 24 lookups per micro-batch: under 1% of the rows


class Classifier(nn.Module):
    """Word and position embeddings, mean pooling, a linear head: BERT's embedding layer in small."""

    def __init__(self):
        super().__init__()
        self.words, self.positions, self.head = nn.Embedding(V, D), nn.Embedding(T, D), nn.Linear(D, 4)

    def forward(self, ids, labels):
        h = self.words(ids) + self.positions(torch.arange(ids.shape[1]))
        return F.cross_entropy(self.head(h.mean(1)), labels)


class TiedLM(nn.Module):
    """An embedding shared with the output layer: its gradient is dense."""

    def __init__(self):
        super().__init__()
        self.words, self.out = nn.Embedding(V, D), nn.Linear(D, V, bias=False)
        self.out.weight = self.words.weight

    def forward(self, ids, labels):
        return F.cross_entropy(self.out(self.words(ids[:, :-1])).reshape(-1, V), ids[:, 1:].reshape(-1))


def batch(step: int, rank: int, wide: bool = False):
    """Rank-specific ids; every rank also looks up rows 0..3 (shared rows are summed across ranks)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, V, (512 if wide else B, T), generator=g)
    ids[:, 0] = torch.arange(ids.shape[0]) % 4
    return ids, torch.randint(0, 4, (ids.shape[0],), generator=g)


def grads(model) -> dict:
    inner = getattr(model, "module", model)
    return {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}


def assert_close(ours: dict, ref: dict, terms: dict, n: int, what: str):
    assert ours.keys() == ref.keys(), what
    for k in ref:
        if n == 2:
            assert torch.equal(ours[k], ref[k]), f"{what}: {k} differs on 2 ranks"
        else:  # reordering n float32 terms: (n-1) ulps of the sum of magnitudes, with a margin of 2
            bound = 2 * (n - 1) * 2.0**-24 * terms[k] + 1e-30
            assert bool(((ours[k] - ref[k]).abs() <= bound).all()), f"{what}: {k} beyond the reordering bound"


def magnitudes(model, ids, labels, n) -> dict:
    """sum over ranks of |g_r / n|, from this rank's own local gradient, all-reduced."""
    import torch.distributed as dist

    local = copy.deepcopy(getattr(model, "module", model))
    local.zero_grad(set_to_none=True)
    local(ids, labels).backward()
    out = {}
    for k, p in local.named_parameters():
        t = p.grad.abs() / n
        dist.all_reduce(t)
        out[k] = t
    return out


def _exchange_cases(rank, n, algorithm):
    for make, wide in ((Classifier, False), (Classifier, True), (TiedLM, False)):
        torch.manual_seed(0)
        base = make()
        native = ddp_native.wrap(copy.deepcopy(base), torch.device("cpu"))
        ours = DistributedDataParallel(copy.deepcopy(base), all_reduce=algorithm, sparse_embeddings=True)
        ids, labels = batch(0, rank, wide)
        native(ids, labels).backward()
        ours(ids, labels).backward()
        what = f"{make.__name__} wide={wide} n={n} {algorithm}"
        assert_close(grads(ours), grads(native), magnitudes(base, ids, labels, n), n, what)
        modes = {r["bucket"]: r["mode"] for r in ours.reducer.exchanges}
        if make is TiedLM:
            assert modes == {}, "a tied embedding is never exchanged by rows"
        else:
            expected = "dense" if wide else "sparse"  # ~1,900 of 3,000 rows per rank: past break-even
            assert modes == {"sparse:words.weight": expected, "sparse:positions.weight": "dense"}, modes


@pytest.mark.parametrize("world_size", world_sizes(2, 3, 4))
@pytest.mark.parametrize("algorithm", ["torch", "ring"])
def test_sparse_exchange_equals_the_dense_all_reduce(tmp_path, world_size, algorithm):
    run(_exchange_cases, world_size, tmp_path, algorithm)


def _accumulation_and_dirty(rank, n):
    torch.manual_seed(0)
    base = Classifier()
    native = ddp_native.wrap(copy.deepcopy(base), torch.device("cpu"))
    ours = DistributedDataParallel(copy.deepcopy(base), sparse_embeddings=True)
    for model in (native, ours):  # two micro-batches, the first under no_sync: rows of both count
        with model.no_sync():
            model(*batch(1, rank)).backward()
        model(*batch(2, rank)).backward()
    assert torch.equal(grads(ours)["words.weight"], grads(native)["words.weight"])
    assert ours.reducer.exchanges[0]["mode"] == "sparse"
    assert ours.reducer.exchanges[0]["rows"] >= 2 * B * T - 8  # both micro-batches' rows (a few repeat)
    for model in (native, ours):  # no zero_grad: the old averaged gradient stays in every row
        model(*batch(3, rank)).backward()
    assert torch.equal(grads(ours)["words.weight"], grads(native)["words.weight"])
    assert ours.reducer.exchanges[0]["mode"] == "dense", "a gradient left from the last step forces the dense path"


def test_no_sync_accumulation_and_gradients_not_zeroed(tmp_path):
    run(_accumulation_and_dirty, 2, tmp_path)


class MaybeWords(Classifier):
    """Looks the words up every time, but leaves them out of the loss when told."""

    def forward(self, ids, labels, use_words=True):
        words = self.words(ids)
        h = self.positions(torch.arange(ids.shape[1])).expand(ids.shape[0], -1, -1) + (words if use_words else 0)
        return F.cross_entropy(self.head(h.mean(1)), labels)


def _lookup_left_out_of_the_loss(rank, n):
    # rank 1 looks rows up but its loss does not use them: no gradient there, and nothing to send
    # (it used to raise alone, leaving rank 0 waiting in the all-gather)
    torch.manual_seed(0)
    base = MaybeWords()
    native = ddp_native.wrap(copy.deepcopy(base), torch.device("cpu"), find_unused_parameters=True)
    ours = DistributedDataParallel(copy.deepcopy(base), sparse_embeddings=True, find_unused_parameters=True)
    for model in (native, ours):
        model(*batch(4, rank), use_words=rank == 0).backward()
    assert torch.equal(grads(ours)["words.weight"], grads(native)["words.weight"])
    assert grads(ours)["words.weight"].abs().max() > 0  # rank 0's rows, averaged
    assert ours.reducer.exchanges[0]["mode"] == "sparse"


def test_a_lookup_left_out_of_the_loss_sends_no_rows(tmp_path):
    run(_lookup_left_out_of_the_loss, 2, tmp_path)


def _join(rank, n):
    torch.manual_seed(0)
    base = Classifier()
    results = {}
    for name in ("native", "ours"):
        model = (
            ddp_native.wrap(copy.deepcopy(base), torch.device("cpu"))
            if name == "native"
            else DistributedDataParallel(copy.deepcopy(base), sparse_embeddings=True)
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        with model.join():
            for step in range(3 if rank == 0 else 2):  # rank 1 runs out of data one step early
                model(*batch(10 + step, rank)).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        results[name] = {k: v.clone() for k, v in model.module.state_dict().items()}
    for k in results["native"]:
        assert torch.allclose(results["ours"][k], results["native"][k], atol=1e-7, rtol=0), k


def test_join_with_uneven_inputs(tmp_path):
    run(_join, 2, tmp_path)


def _train(rank, n, algorithm):
    torch.manual_seed(0)
    base = Classifier()
    weights, modes = {}, set()
    for name in ("native", "ours"):
        model = (
            ddp_native.wrap(copy.deepcopy(base), torch.device("cpu"))
            if name == "native"
            else DistributedDataParallel(copy.deepcopy(base), all_reduce=algorithm)
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        for step in range(6):
            model(*batch(20 + step, rank)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if name == "ours":
                modes |= {(r["bucket"], r["mode"]) for r in model.reducer.exchanges}
        weights[name] = model.module.state_dict()
    assert modes == set(), "3000 x 8 floats is under the 4 MiB of 'auto': dense, like torch"
    # the same run with the sparse exchange forced on
    model = DistributedDataParallel(copy.deepcopy(base), all_reduce=algorithm, sparse_embeddings=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    for step in range(6):
        model(*batch(20 + step, rank)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert model.reducer.exchanges[0]["mode"] == "sparse"
    for k, v in weights["native"].items():
        assert torch.equal(model.module.state_dict()[k], v), f"{k}: sparse training differs from torch's DDP"
        assert torch.equal(weights["ours"][k], v), k


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["torch", "ring"])
def test_training_with_sparse_embeddings_equals_torch_ddp(tmp_path, algorithm):
    run(_train, 2, tmp_path, algorithm)


def test_which_weights_are_sparse():
    torch.manual_seed(0)
    cls, tied = Classifier(), TiedLM()
    params = list(cls.parameters())
    assert sparse_embedding_weights(cls, params, True) == {0: cls.words, 1: cls.positions}
    assert sparse_embedding_weights(cls, params, "auto") == {}  # 96 KB < 4 MiB
    assert sparse_embedding_weights(cls, params, "auto", min_bytes=V * D * 4) == {0: cls.words}
    assert sparse_embedding_weights(cls, params, False) == {}
    assert sparse_embedding_weights(tied, list(tied.parameters()), True) == {}
    with pytest.raises(ValueError, match="sparse_embeddings must be"):
        sparse_embedding_weights(cls, params, "yes")
