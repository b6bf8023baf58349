"""Collectives built only from point-to-point messages: ring all-reduce, its two halves, broadcast.

Every rank sits on a ring r -> r+1 -> ... -> r-1 -> r. The tensor is cut into n chunks
(n = world size, chunk i = `flat.tensor_split(n)[i]`, sizes differ by at most one element).

    ring reduce-scatter, n-1 steps: at step s rank r sends chunk (r-s-1) to r+1, receives
        chunk (r-s-2) from r-1 and adds it into its own copy. After the last step rank r
        holds chunk r summed over all ranks.
    ring all-gather, n-1 steps: at step s rank r sends chunk (r-s) to r+1 and receives chunk
        (r-s-1) from r-1 straight into place. Afterwards every rank holds every chunk.
    ring all-reduce = reduce-scatter, then all-gather.

Each rank sends one chunk of ~N/n elements per step, 2(n-1)/n * N elements in all, whatever n
is: no algorithm sends less (Patarasuk & Yuan 2009), hence NCCL and Horovod use it. nccl-tests
reports bus bandwidth busbw = algbw * 2(n-1)/n (algbw = bytes / time), comparable to link speed.

A rank sends and receives *at the same time* (isend + irecv, wait later): with blocking
send-then-recv every rank would wait in `send` for a neighbour itself blocked in `send`, and a
link would only ever carry one direction.

Two forms of the same ring, read them in this order:
1. the plain ring, `_ring_grouped`: one whole chunk per step, the step's send and receive handed
   to the backend together (`dist.batch_isend_irecv`). It works on every backend (gloo and NCCL);
   it is the form to learn, and the one NCCL always takes (NCCL cuts and pipelines a chunk
   itself, and an NCCL send must be grouped with the receive it waits for). Set
   `GROUPED_STEPS = True` to use it on the CPU too (tests/ddp/test_ddp_equivalence.py does).
2. the streamed ring, `_ring` (the CPU default, gloo): the optimisation. Chunks travel as pieces
   of SEGMENT_BYTES, each passed on as soon as it is final, with WINDOW receives in flight, so
   the pieces stream round the ring without a pause between steps, and a rank adds piece k
   while piece k+1 is on the wire. What it buys over the plain ring, 2 ranks, gloo, 25 MiB
   float32, the forms interleaved, median of 20 rounds (`python docs/examples/ring_forms.py
   --nproc 2 --mib 25 --reps 20`): on 2 idle CPU cores (2026-12-07, load average under 0.3 before
   the first of three runs back to back) plain / streamed 1.10, 1.22, 1.02 (plain 23-32 ms,
   streamed 23-26 ms), a few percent; on the same kind of cores shared with other jobs (load
   average ~8) 1.45 (131 against 90 ms): streaming pays most when a rank is often descheduled,
   since each piece moves on without waiting for the whole chunk. Both forms give the same
   sums (tests/ddp/test_ddp_equivalence.py runs the DDP with each).
NCCL ignores message tags, so on GPUs our collectives of one group run from one thread in order: a
blocking call while work.py's worker still issues launched ones on the group is refused (`check`),
and work.py runs them on its own CUDA stream (its stream rules).

Every call here blocks until this rank has its result. Every message carries the operation's
*tag*, taken from a per-group counter in call order (`next_tag`): every rank calls in the same
order, so the k-th operation gets the same tag everywhere and its messages can never be
confused with another operation's, even when several run at once. work.py (after
collectives_classic.py in the reading order) runs these same functions in the background,
which is what DDP needs.

Sources: P. Patarasuk, X. Yuan, "Bandwidth optimal all-reduce algorithms for clusters of
workstations", JPDC 2009; R. Thakur, R. Rabenseifner, W. Gropp, "Optimization of collective
communication operations in MPICH", IJHPCA 2005; nccl-tests doc/PERFORMANCE.md (bus bandwidth).
"""

from __future__ import annotations

import itertools
import threading
import weakref

import torch
import torch.distributed as dist

SUM, AVG, MAX = dist.ReduceOp.SUM, dist.ReduceOp.AVG, dist.ReduceOp.MAX
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64)
# No message carries more than 4 MiB. Fewer, larger messages save the ~35 us each costs us in
# Python; smaller ones pipeline finer. Measured at 25 MiB (python -m experiments.bench.ring,
# docs/benchmarks.md §10): 4 MiB beat 1 MiB in 4 of 5 runs, on 2 and on 4 ranks.
SEGMENT_BYTES = 4 << 20
WINDOW = 2  # pieces in flight while reducing, each landing in a scratch slot (gloo: 2)
GROUPED_STEPS = False  # True: the grouped form (`_ring_grouped`) on the CPU too; always on CUDA (tests set it)


# ----------------------------------------------------------------------------- the ring


@torch.no_grad()
def _ring_grouped(flat: torch.Tensor, group, tag: int, op, reduce_steps: int, gather_steps: int) -> None:
    """The plain ring, for every backend (the one NCCL always takes): one whole chunk per step, the
    step's send and receive handed to the backend together (`dist.batch_isend_irecv`, NCCL's group call).

    Why not the streamed form: an NCCL send blocks its stream until the peer has posted the matching
    receive, so if every rank issued its send first, all would wait forever; grouped, NCCL starts both
    at once. NCCL cuts a chunk into pieces itself, so ours are not needed.
    Streams: the ops of this function run on the calling thread's current CUDA stream (NCCL's internal
    stream waits for it at each launch, and `Work.wait()` makes it wait for NCCL, without blocking the
    host), so each step's add sees the received chunk and the next step's send sees the sum. `scratch`
    is allocated on that same stream, so freeing it at return is safe in stream order (NCCL keeps its
    own reference until its kernels end). Launched through work.py, that stream is the worker's own,
    which first waits for the bucket's gradients; called directly, it is the caller's.
    """
    rank, n, nxt, prv = _neighbours(group)
    chunks = flat.tensor_split(n)
    plan = [(rank - s - 2) % n for s in range(reduce_steps)] + [(rank - s - 1) % n for s in range(gather_steps)]
    send = (rank - 1) % n if reduce_steps else rank  # the chunk our own data starts with
    scratch = torch.empty_like(chunks[0]) if reduce_steps and plan else None  # chunk 0 is the largest
    for t, c in enumerate(plan):
        reducing = t < reduce_steps
        incoming = scratch[: chunks[c].numel()] if reducing else chunks[c]
        ops = []
        if chunks[send].numel():  # an empty chunk (fewer elements than ranks) is sent by nobody
            ops.append(dist.P2POp(dist.isend, chunks[send], nxt, group, tag))
        if incoming.numel():
            ops.append(dist.P2POp(dist.irecv, incoming, prv, group, tag))
        for work in dist.batch_isend_irecv(ops) if ops else ():
            work.wait()
        if reducing:
            _reduce_into(chunks[c], incoming, op)
            if op == AVG and t == reduce_steps - 1:
                chunks[c].div_(n)
        send = c  # what we just received (and reduced) is what the next rank needs next


@torch.no_grad()
def _ring(flat: torch.Tensor, group, tag: int, op, reduce_steps: int, gather_steps: int) -> None:
    """`reduce_steps` steps of ring reduce-scatter, then `gather_steps` of ring all-gather, on `flat`.

    At step t a rank receives one chunk from the previous rank and reduces it in (reduce-scatter)
    or copies it (all-gather). What it receives at step t is what the next rank needs at step
    t+1, so each piece is passed on the moment it is final: no pause between steps or phases.
    """
    if flat.is_cuda or GROUPED_STEPS:
        return _ring_grouped(flat, group, tag, op, reduce_steps, gather_steps)
    rank, n, nxt, prv = _neighbours(group)
    chunks = [_pieces(chunk) for chunk in flat.tensor_split(n)]
    # the chunk received at each step: (rank-s-2) in reduce-scatter, (rank-s-1) in all-gather
    plan = [(rank - s - 2) % n for s in range(reduce_steps)] + [(rank - s - 1) % n for s in range(gather_steps)]
    if not plan:  # world size 1
        return
    first = (rank - 1) % n if reduce_steps else rank  # our own data starts the stream
    sends = [dist.isend(piece, dst=nxt, group=group, tag=tag) for piece in chunks[first]]
    for t, c in enumerate(plan):
        for piece in _receive_pieces(chunks[c], prv, group, tag, op if t < reduce_steps else None):
            if op == AVG and t == reduce_steps - 1:
                piece.div_(n)  # chunk `rank` is complete: average it (only 1/n of the data)
            if t + 1 < len(plan):
                sends.append(dist.isend(piece, dst=nxt, group=group, tag=tag))
    for work in sends:
        work.wait()  # before anyone may touch the tensor again


def _receive_pieces(targets: list[torch.Tensor], src: int, group, tag: int, op=None):
    """Receive `targets` from global rank `src`, one message per piece; yield each piece once final.

    op None: pieces land straight in place (all receives posted at once). op given: they land in
    WINDOW scratch slots (little memory, hot in cache) and are reduced into place (target (op)=
    incoming) while the next pieces are still on the wire. Messages from one peer with one tag
    are matched in the order the receives were posted, so the sender must send them in order.
    """
    window = len(targets) if op is None else min(WINDOW, len(targets))
    slots = [] if op is None else [torch.empty_like(targets[0]) for _ in range(window)]  # [0] is largest

    def landing(k: int) -> torch.Tensor:
        return targets[k] if op is None else slots[k % window][: targets[k].numel()]

    pending = [dist.irecv(landing(k), src=src, group=group, tag=tag) for k in range(window)]
    for k, target in enumerate(targets):
        pending[k].wait()  # blocks in C++ with the GIL released
        if op is not None:
            _reduce_into(target, landing(k), op)
            if k + window < len(targets):  # the slot just emptied takes a later piece
                pending.append(dist.irecv(landing(k + window), src=src, group=group, tag=tag))
        yield target


@torch.no_grad()
def _chain_broadcast(flat: torch.Tensor, group, tag: int, src: int) -> None:
    """Rank `src` (of `group`) sends `flat` down the chain src -> src+1 -> ...; see `broadcast`."""
    rank, n, nxt, prv = _neighbours(group)
    if n == 1:
        return
    pos = (rank - src) % n  # our place in the chain src -> src+1 -> ... -> src-1
    if flat.is_cuda or GROUPED_STEPS:  # NCCL: the whole tensor per hop (NCCL pipelines it itself)
        if pos > 0 and flat.numel():
            dist.irecv(flat, src=prv, group=group, tag=tag).wait()
        if pos < n - 1 and flat.numel():
            dist.isend(flat, dst=nxt, group=group, tag=tag).wait()
        return
    pieces = _pieces(flat)
    # Each piece is forwarded the moment it arrives, so all links of the chain are busy at once
    # (a pipeline) instead of the whole tensor hopping from rank to rank.
    sends = []
    for piece in pieces if pos == 0 else _receive_pieces(pieces, prv, group, tag):
        if pos < n - 1:  # the last rank of the chain only receives
            sends.append(dist.isend(piece, dst=nxt, group=group, tag=tag))
    for work in sends:
        work.wait()


# ----------------------------------------------------------------------------- public API


def all_reduce(tensor: torch.Tensor, op=SUM, group=None, tag: int | None = None) -> torch.Tensor:
    """Ring all-reduce, in place: afterwards every rank's `tensor` holds op(tensor of all ranks).

    Args:
        tensor: contiguous tensor on the CPU (gloo) or on this rank's GPU (NCCL), any shape (N
            elements of b bytes; N may be 0 or < n),
            dtype float32/float16/bfloat16/int64; same shape and dtype on every rank.
        op: `dist.ReduceOp.SUM`, `AVG` (SUM, then divide by n; floating point only; float16
            sums overflow above 65504 before the division) or `MAX`.
        group: process group (default: the world).
        tag: the operation's message tag; None takes `next_tag(group)` (work.py passes the tag
            it took at launch).
    Returns: `tensor`, once this rank holds the result.
    Cost per rank (chunk sizes c_i ~= N/n): 2(n-1) steps of one chunk, each chunk sent as
        ceil(c_i*b / SEGMENT_BYTES) messages (none if empty); bytes sent
        (2N - c_r - c_{r+1}) * b ~= 2(n-1)/n * N * b, and as many received.
    Raises: RuntimeError (no process group), TypeError (dtype, int64 AVG), ValueError (op,
        non-contiguous, neither CPU nor CUDA); see `check`.
    Sources: Patarasuk & Yuan 2009; nccl-tests doc/PERFORMANCE.md (busbw = algbw * 2(n-1)/n).
    """
    group, tag = check(tensor, op, group, tag)
    n = dist.get_world_size(group)
    _ring(tensor.view(-1), group, tag, op, n - 1, n - 1)
    return tensor


def reduce_scatter(tensor: torch.Tensor, op=SUM, group=None, tag: int | None = None) -> torch.Tensor:
    """Ring reduce-scatter, in place: rank r's chunk `tensor.view(-1).tensor_split(n)[r]` becomes
    op over all ranks of that chunk; the other chunks are left holding partial results.

    Args, dtypes, ops, errors: as `all_reduce`.
    Returns: the 1-D view of rank r's chunk (c_r elements).
    Cost per rank: n-1 steps of one chunk (messages as in `all_reduce`), (N - c_r) * b bytes
        sent ~= (n-1)/n * N * b. Sources: Patarasuk & Yuan 2009; Thakur et al. 2005.
    """
    group, tag = check(tensor, op, group, tag)
    n = dist.get_world_size(group)
    _ring(tensor.view(-1), group, tag, op, n - 1, 0)
    return tensor.view(-1).tensor_split(n)[dist.get_rank(group)]


def all_gather(tensor: torch.Tensor, group=None, tag: int | None = None) -> torch.Tensor:
    """Ring all-gather, in place: rank r contributes chunk `tensor.view(-1).tensor_split(n)[r]`;
    afterwards every rank holds all n chunks (whatever it had elsewhere is overwritten).

    Args, dtypes, errors: as `all_reduce` (no op). Returns: `tensor`.
    Cost per rank: n-1 steps of one chunk, (N - c_{r+1}) * b bytes sent ~= (n-1)/n * N * b.
    Sources: Patarasuk & Yuan 2009; Thakur, Rabenseifner & Gropp 2005.
    """
    group, tag = check(tensor, SUM, group, tag)
    _ring(tensor.view(-1), group, tag, None, 0, dist.get_world_size(group) - 1)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0, group=None, tag: int | None = None) -> torch.Tensor:
    """Pipelined chain broadcast, in place: every rank's `tensor` becomes rank `src`'s.

    The tensor flows src -> src+1 -> ... in S = ceil(N*b / SEGMENT_BYTES) pieces, every rank
    forwarding piece k-1 while receiving piece k: time ~ (S + n - 2) piece transfers. (A binomial
    tree takes log2(n) rounds but its root sends N*b*log2(n) bytes: fine for small tensors, the
    chain is the bandwidth-optimal choice for large ones; Thakur, Rabenseifner & Gropp 2005.)
    Args: `src`, a rank of `group`; the rest as `all_reduce`. Returns: `tensor`.
    Cost per rank: S messages, N*b bytes sent, by every rank but the chain's last (src-1),
        which only receives.
    Raises: as `all_reduce`, and ValueError if `src` is not a rank of the group.
    """
    group, tag = check(tensor, SUM, group, tag)
    if not 0 <= src < dist.get_world_size(group):
        raise ValueError(f"src={src} is not a rank of a group of {dist.get_world_size(group)}")
    _chain_broadcast(tensor.view(-1), group, tag, src)
    return tensor


# ----------------------------------------------------------------------------- helpers

_tags: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ProcessGroup -> counter
_tags_lock = threading.Lock()
_in_flight: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ProcessGroup -> launched CUDA ops not yet issued


def count_in_flight(group, delta: int) -> None:
    """work.py's interface: +1 when it launches an operation on CUDA tensors of `group`, -1 once the
    worker has issued all of its NCCL calls (or it failed). `check` refuses blocking CUDA calls meanwhile."""
    with _tags_lock:
        _in_flight[group] = _in_flight.get(group, 0) + delta


def next_tag(group=None) -> int:
    """The next message tag of `group` (default: the world), in call order on this process.

    Every rank takes tags in the same order, so operation k has the same tag on every rank.
    Tags start at 2**30: int32 >= 0 for gloo, far above the small tags users pick.
    """
    group = group if group is not None else dist.group.WORLD
    with _tags_lock:  # one counter, whichever thread asks
        counter = _tags.setdefault(group, itertools.count())
        return (1 << 30) + next(counter) % (1 << 30)


def check(tensor: torch.Tensor, op=SUM, group=None, tag: int | None = None, launched: bool = False):
    """Validate what every public function takes; return (process group, tag) to use.

    `launched`: work.py is launching it (it takes the tag now and orders it on its worker).
    A call with `tag=None` on a CUDA tensor is a blocking one from the caller's thread: over NCCL it
    must not run while work.py's worker is still issuing launched operations of the same group (the
    two threads would interleave differently on each rank), so it is refused then.

    Raises: RuntimeError (no process group; a blocking CUDA collective while launched ones of the
    group are still being issued: `work.launch(...).wait()` it instead), TypeError (not a tensor,
    dtype not in DTYPES, AVG on int64: the mean of integers is no integer, gloo refuses it too; use
    SUM and divide as you see fit), ValueError (op not SUM/AVG/MAX, tensor not contiguous, neither
    on the CPU nor on CUDA).
    """
    if not dist.is_initialized():
        raise RuntimeError("no process group: call torch.distributed.init_process_group first")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in DTYPES:
        raise TypeError(f"dtype {tensor.dtype} not supported; use one of {DTYPES}")
    if op not in (SUM, AVG, MAX):
        raise ValueError(f"op {op} not supported; use ReduceOp.SUM, AVG or MAX")
    if op == AVG and not tensor.is_floating_point():
        raise TypeError("ReduceOp.AVG needs a floating-point tensor; for int64 use SUM and divide")
    if not tensor.is_contiguous():
        raise ValueError("tensor must be contiguous (we send slices of its memory); call .contiguous()")
    if tensor.device.type not in ("cpu", "cuda"):
        raise ValueError(f"tensor must be on the CPU (gloo) or a CUDA GPU (NCCL), got {tensor.device}")
    group = group if group is not None else dist.group.WORLD
    if tensor.is_cuda and tag is None and not launched and _in_flight.get(group, 0):
        raise RuntimeError(
            "a blocking collective on CUDA tensors was called while launched ones (work.py) of the same process "
            "group are still being issued on its worker thread; over NCCL the two threads would order their "
            "operations differently on each rank (a hang or wrong sums). Launch this one too, "
            "`work.launch(collective, tensor).wait()`, or wait() for the launched ones first."
        )
    return group, (next_tag(group) if tag is None else tag)


def _neighbours(group) -> tuple[int, int, int, int]:
    """(rank, world size, next, previous) in `group`; next/previous as global ranks, which isend/irecv take."""
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    return rank, n, dist.get_global_rank(group, (rank + 1) % n), dist.get_global_rank(group, (rank - 1) % n)


def _reduce_into(acc: torch.Tensor, incoming: torch.Tensor, op) -> None:
    """acc <- acc (op) incoming, in place. AVG reduces like SUM; the division comes once, at the end."""
    if op == MAX:
        torch.maximum(acc, incoming, out=acc)
    else:
        acc.add_(incoming)


def _pieces(t: torch.Tensor) -> list[torch.Tensor]:
    """`t` cut into its non-empty views of at most SEGMENT_BYTES: one message each."""
    return [piece for piece in t.split(max(1, SEGMENT_BYTES // t.element_size())) if piece.numel()]
