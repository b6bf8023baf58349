"""Sparse embedding gradients: send only the rows that the batch looked up.

A word embedding is the largest tensor of a small transformer (all-MiniLM-L6: 30,522 x 384
floats, 46.9 MB of its 91 MB of gradients), and its gradient is zero in every row that no
token of the micro-batch looked up: 16 texts of 64 tokens touch at most 1,024 rows, 3.4%.
torch's DDP all-reduces the whole dense tensor anyway. Here each rank sends only its rows.

Why not `nn.Embedding(sparse=True)`? It makes the gradient a sparse COO tensor, which torch's
DDP can all-reduce, but then the optimizer must take sparse gradients: SGD, Adagrad and
SparseAdam do; Adam and AdamW do not (they raise), and AdamW is what fine-tuning uses, since
its weight decay and moment estimates touch every row each step. So the gradient stays dense
(any optimizer works, nothing about the model changes) and only the *exchange* is sparse, the
way Horovod all-reduces TensorFlow's IndexedSlices gradients: by an all-gather of the indices
and of the rows (Sergeev & Del Balso, "Horovod", 2018; `horovod/tensorflow/__init__.py`).

Per synced backward, for each sparse embedding weight (V rows of D elements, b bytes each), on
n ranks:
1. rows: the sorted unique token ids that this rank's training forwards looked up since the
   last synced backward (a forward pre-hook on the `nn.Embedding`, so accumulated micro-batches
   under no_sync count too): k_r of them.
2. counts: one all-gather of (k_r, dirty_r) from every rank; K = max k_r.
3. decide, with the same numbers on every rank, so the same way: sparse when no rank is dirty
   and the all-gather sends at most BREAK_EVEN times the bytes of a ring all-reduce of the dense
   gradient, (n-1) K (D b + 8) <= BREAK_EVEN x 2(n-1)/n V D b; else dense.
4. sparse: all-gather the indices (n x K int64) and the rows, pre-divided by n as a bucket's
   gradients are (n x K x D); zero this rank's own rows of the gradient, which is now zero
   everywhere, and add rank 0's rows, then rank 1's, ... (`index_add_`). dense: all-reduce the
   whole gradient / n, as its bucket would have been.

Exact, not approximate. A row no rank touched is zero on every rank and stays zero. A touched
row becomes the sum over ranks of grad_r / n, the same terms the dense all-reduce adds. On 2
ranks the sum has two terms and a + b = b + a in IEEE arithmetic: the result is bit for bit
torch's DDP's. On n >= 3 ranks we add in rank order, gloo in its own (which depends on the
algorithm and on where a row falls in its chunks); floating-point addition is not associative,
so the two may differ by the rounding of reordering n terms, at most about (n-1) x 2^-24 x
sum_r |grad_r / n| per element (Higham, "Accuracy and Stability of Numerical Algorithms", §4.2).

"dirty" makes a rank ask for the dense path: the weight already had a nonzero gradient before
the first forward of the step (no `zero_grad()` in between; then rows nobody looked up are not
zero), or it got a gradient while no lookup was seen (the weight was used some other way than
calling its `nn.Embedding`). Weights shared with another module (tied to an output layer) get
a dense gradient every step and are never made sparse. With DDP_FROM_SCRATCH_DEBUG=1 every step
also checks that no row outside the looked-up ones has a gradient (debug.py); a row that does
makes that rank dirty, and a warning says so.

Streams (CUDA): counts, indices and values are made on the caller's current stream and handed to
`comm`'s collectives, which record them on the stream they run on (work.py's rule 3, or NCCL's
own); every `.wait()` in `exchange` is a future's wait, which makes the current stream wait for the
collective (no host sync). The one host sync is `counts.tolist()`, once: the sparse-or-dense
decision and the all-gather's size K need the numbers on the CPU, the same on every rank.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn as nn

from . import debug
from .bucket import MB
from .comm_hooks import CommState

MIN_BYTES = 4 * MB  # "auto": smaller tables (positions, token types) are a bucket's worth of latency
# Measured (python -m experiments.bench.sparse, docs/benchmarks.md §10): on 2 and 4 ranks the sparse
# exchange is as slow as the dense all-reduce at 0.39 (gloo) to 0.52 (our ring) of its bytes; at
# 0.3 it takes half the time. 0.3 keeps a margin for a busier machine.
BREAK_EVEN = 0.3


def sparse_embedding_weights(
    module: nn.Module, params: list[torch.Tensor], mode="auto", min_bytes: int = MIN_BYTES
) -> dict[int, nn.Embedding]:
    """Which of `params` get the sparse exchange: {index into params: the nn.Embedding owning it}.

    Args:
        module: the wrapped model.
        params: the parameters the reducer syncs (registration order).
        mode: "auto" (the default): untied `nn.Embedding` weights of at least `min_bytes` bytes;
            True: every untied `nn.Embedding` weight; False: none.
    A weight counts as tied when more than one module holds it as a parameter (an embedding
    shared with a language-model head): its gradient is dense.
    Raises: ValueError for another mode.
    """
    if mode not in ("auto", True, False):
        raise ValueError(f"sparse_embeddings must be 'auto', True or False, got {mode!r}")
    if mode is False:
        return {}
    owners: dict[int, int] = {}
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    index = {id(p): i for i, p in enumerate(params)}
    chosen = {}
    for m in module.modules():
        if type(m) is nn.Embedding and id(m.weight) in index and owners[id(m.weight)] == 1:
            if mode is True or m.weight.numel() * m.weight.element_size() >= min_bytes:
                chosen[index[id(m.weight)]] = m
    return dict(sorted(chosen.items()))


class EmbeddingRows:
    """The rows of one `nn.Embedding` that training forwards looked up since the last synced backward.

    A forward pre-hook records the token ids (any shape, int64) of every forward run with grad
    enabled; `take()` returns them as sorted unique row indices (int64, shape (k,)) and starts over.
    """

    def __init__(self, embedding: nn.Embedding):
        self.weight = embedding.weight
        self.lookups: list[torch.Tensor] = []
        self.dirty = False
        self.handle = embedding.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs) -> None:
        if not torch.is_grad_enabled():  # evaluation: no backward will follow
            return
        ids = args[0] if args else kwargs["input"]
        if not self.lookups:  # the step's first forward: rows nobody looks up must start at zero
            grad = self.weight.grad
            self.dirty = grad is not None and bool(grad.any())
        self.lookups.append(ids.detach().reshape(-1))

    def take(self) -> tuple[torch.Tensor, bool]:
        """(sorted unique rows looked up, dirty) since the last call; then forget them."""
        if self.lookups:
            rows = torch.unique(torch.cat(self.lookups))  # sorted
        else:
            rows = torch.empty(0, dtype=torch.int64, device=self.weight.device)
        dirty, self.lookups, self.dirty = self.dirty, [], False
        return rows, dirty


def _rows_to_send(table: EmbeddingRows, grad: torch.Tensor | None, contribute: bool, name: str):
    """The rows this rank sends (int64, shape (K,)) and whether its gradient is "dirty" (must go dense).

    Dirty: a gradient with no lookup seen (its rows are unknown) or, checked under the debug log, a
    gradient in rows no forward looked up (the table used outside its nn.Embedding).
    """
    rows, dirty = table.take()
    if not contribute:
        return rows[:0], False
    if grad is None:
        return rows[:0], dirty  # looked up, but no gradient came (the lookup was not in the loss): nothing to send
    if rows.numel() == 0:
        return rows, True  # a gradient, but no lookup seen: we cannot know its rows
    if not dirty and debug.enabled():
        outside = torch.ones(table.weight.shape[0], dtype=torch.bool, device=grad.device)
        outside[rows] = False
        if bool(grad[outside].any()):
            warnings.warn(
                f"{name}: gradient in rows no forward looked up (used outside its nn.Embedding?); "
                "exchanged dense this step",
                stacklevel=3,
            )
            dirty = True
    return rows, dirty


def exchange(
    table: EmbeddingRows, comm: CommState, rank: int, name: str, contribute: bool = True, break_even: float = BREAK_EVEN
) -> dict:
    """Average `table.weight.grad` over the ranks, sending only looked-up rows when that pays.

    Blocks until done; every rank must call it at the same point (the reducer does, after
    launching its buckets). Afterwards `weight.grad` (float, shape (V, D)) holds the average
    over the ranks, exactly as a bucket all-reduce would leave it (see the module docstring);
    it stays None if no rank has a gradient.

    Args:
        comm: the reducer's CommState (its all_gather and all_reduce).
        rank: this rank's index in the group.
        name: the parameter's name, for the warning and the record.
        contribute: False for a rank that joined (join.py): it sends nothing (0 rows, or zeros
            in the dense all-reduce) and leaves its gradient alone.
        break_even: sparse while the all-gather sends at most this share of the all-reduce's bytes.
    Streams (CUDA): see the module docstring's last paragraph.
    Returns: one record {"bucket": "sparse:<name>", "mode": "sparse"|"dense"|"none", "rows" (K),
        "bytes" (put into the collectives by this rank), "sent_bytes" (sent per rank by the ring
        algorithms: (n-1) K (D b + 8), or 2 (n-1)/n V D b for dense), "launch", "done"
        (perf_counter seconds)}; on CUDA also "timer", a `debug.CollectiveTimer` of the exchange in
        stream order (from before the counts to after the last index_add), which
        `experiments.comm_timing.place_on_host_clock` turns into "launch"/"done", as for the buckets:
        the host clock only says when the work was enqueued.
    """
    w, n = table.weight, comm.world_size
    launch = time.perf_counter()
    timer = debug.CollectiveTimer(w.device) if w.is_cuda else None  # an event on the current stream, now
    grad = w.grad if contribute else None
    rows, dirty = _rows_to_send(table, grad, contribute, name)
    counts = torch.zeros(n, 2, dtype=torch.int64, device=w.device)
    counts[rank, 0], counts[rank, 1] = rows.numel(), int(dirty)
    comm.all_gather(counts).wait()
    gathered = counts.tolist()  # the one host sync (CUDA: the current stream now waits for the all-gather)
    k = [row[0] for row in gathered]
    K, any_dirty = max(k), any(row[1] for row in gathered)
    V, D = w.shape
    row_bytes = D * w.element_size()
    dense_sent = 2 * (n - 1) * V * row_bytes // n
    sparse_sent = (n - 1) * K * (row_bytes + 8)
    record = {"bucket": f"sparse:{name}", "rows": K, "launch": launch}
    scale = 1.0 / n
    if not any_dirty and K == 0:  # nobody has a gradient: leave it None, as a bucket would
        record.update(mode="none", bytes=counts.numel() * 8, sent_bytes=0)
    elif any_dirty or sparse_sent > break_even * dense_sent:
        buf = torch.mul(grad, scale) if grad is not None else torch.zeros_like(w)
        comm.all_reduce(buf).wait()
        if contribute:
            w.grad = buf
        record.update(mode="dense", bytes=V * row_bytes, sent_bytes=dense_sent)
    else:
        sent = _gather_rows(comm, w, grad, rows, rank, k, scale, contribute)
        record.update(mode="sparse", bytes=sent, sent_bytes=sparse_sent)
    record["done"] = time.perf_counter()
    if timer is not None:
        timer.stop()  # after the waits and the index_adds on this stream: the exchange's end in stream order
        record["timer"] = timer
    return record


def _gather_rows(comm: CommState, w, grad, rows, rank: int, k: list[int], scale: float, contribute: bool) -> int:
    """The sparse path: every rank all-gathers K = max(k) (index, row) pairs, padded, then adds them
    in rank order into a zeroed gradient. Returns the bytes this rank put into the two all-gathers."""
    n, K, D = len(k), max(k), w.shape[1]
    idx = torch.zeros(n, K, dtype=torch.int64, device=w.device)
    vals = torch.zeros(n, K, D, dtype=w.dtype, device=w.device)
    mine = rows.numel()
    if mine:
        idx[rank, :mine] = rows
        torch.mul(grad.index_select(0, rows), scale, out=vals[rank, :mine])  # pre-divided, as in a bucket
    f_idx, f_vals = comm.all_gather(idx), comm.all_gather(vals)
    f_idx.wait(), f_vals.wait()
    if contribute:
        if grad is None:
            grad = w.grad = torch.zeros_like(w)
        else:
            grad.index_fill_(0, rows, 0)  # now zero everywhere: the untouched rows already were
        for r in range(n):  # in rank order, the same on every rank
            grad.index_add_(0, idx[r, : k[r]], vals[r, : k[r]])
    return idx.numel() * 8 + vals.numel() * w.element_size()
