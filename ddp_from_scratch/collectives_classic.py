"""Two classic all-reduce algorithms, to set the ring (collectives.py) against.

n ranks, N elements of b bytes, p = largest power of two <= n (a "message" here is one transfer;
on the wire it goes as ceil(bytes / SEGMENT_BYTES) messages):

    algorithm                 messages per rank          bytes sent per rank                 rounds
    naive (reduce + bcast)    rank 0: 2(n-1), others 2   rank 0: (n-1)*N*b, others: N*b      2(n-1) at rank 0
    halving-doubling          2*log2(p) (+2 if n != p)   ~2(p-1)/p * N*b (+N*b if n != p)    2*log2(p) (+2)
    ring (collectives.py)     2(n-1)                     2(n-1)/n * N*b                      2(n-1)

The naive one funnels everything through rank 0, whose link carries (n-1)*N*b each way: time
grows linearly with n. Recursive halving-doubling (Rabenseifner) sends as few bytes as the ring
but in log2(p) rounds instead of n-1, so it wins when messages are small and latency dominates;
for large messages on a ring-shaped network the ring's neighbour-only traffic wins.

Same call as `collectives.all_reduce` (in place, blocking, any shape, float32/float16/bfloat16/
int64, SUM/AVG/MAX; `work.launch` runs them in the background too) and the same errors (see
`collectives.check`).

Sources: R. Thakur, R. Rabenseifner, W. Gropp, "Optimization of collective communication
operations in MPICH", IJHPCA 2005 (sections 4.4-4.5: recursive halving and doubling, and the
fold for non-power-of-two n used below).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import AVG, SUM, _pieces, _receive_pieces, check


def _exchange(send_buf, dst: int, recv_buf, src: int, group, tag: int, op=None) -> None:
    """Send `send_buf` to global rank `dst` while receiving `recv_buf` from `src`; wait for both.

    Both travel as `_pieces` (collectives.py); with `op`, what arrives is reduced into
    `recv_buf`. Either may be None. Sending and receiving at once keeps two peers that
    exchange from waiting on each other.
    """
    sends = [] if send_buf is None else [dist.isend(p, dst=dst, group=group, tag=tag) for p in _pieces(send_buf)]
    for _ in _receive_pieces([] if recv_buf is None else _pieces(recv_buf), src, group, tag, op):
        pass
    for work in sends:
        work.wait()  # our data must not change (or be freed) before it has left


@torch.no_grad()
def _naive(flat: torch.Tensor, group, tag: int, op) -> None:
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    root = dist.get_global_rank(group, 0)
    if rank != 0:
        _exchange(flat, root, None, root, group, tag)  # my contribution up ...
        _exchange(None, root, flat, root, group, tag)  # ... and the result back down
        return
    for peer in range(1, n):  # one peer at a time: rank 0's link is the bottleneck
        src = dist.get_global_rank(group, peer)
        _exchange(None, src, flat, src, group, tag, op)
    if op == AVG:
        flat.div_(n)
    for peer in range(1, n):
        dst = dist.get_global_rank(group, peer)
        _exchange(flat, dst, None, dst, group, tag)


def _cpu_only(tensor: torch.Tensor, name: str) -> None:
    if tensor.is_cuda:  # their send-then-receive exchanges would block NCCL's stream (see collectives._ring_grouped)
        raise ValueError(f"{name} runs on CPU tensors (gloo) only; on GPUs use collectives.all_reduce (the ring)")


def naive_all_reduce(tensor: torch.Tensor, op=SUM, group=None, tag: int | None = None) -> torch.Tensor:
    """Reduce everything to rank 0, then send the result from rank 0 to every other rank.

    Args/returns/errors: as `collectives.all_reduce`.
    Cost: rank 0 receives (n-1)*N*b bytes in n-1 messages and sends as much in n-1 more;
        every other rank sends N*b and receives N*b (one message each way). Large messages
        are cut into SEGMENT_BYTES pieces, which changes the message count, not the bytes.
    Source: the "reduce + broadcast" baseline of Thakur, Rabenseifner & Gropp 2005.
    """
    group, tag = check(tensor, op, group, tag)
    _cpu_only(tensor, "naive_all_reduce")
    _naive(tensor.view(-1), group, tag, op)
    return tensor


@torch.no_grad()
def _halving_doubling(flat: torch.Tensor, group, tag: int, op) -> None:
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    p = 1 << (n.bit_length() - 1)  # largest power of two <= n
    extra = n - p  # ranks 0..2*extra-1 pair up so that exactly p ranks remain
    gr = lambda r: dist.get_global_rank(group, r)  # rank in group -> global rank
    # 1. Fold (only if n is not a power of two): even rank 2i hands its whole tensor to 2i+1,
    #    which reduces it in, then waits for the final result.
    if rank < 2 * extra and rank % 2 == 0:
        _exchange(flat, gr(rank + 1), None, 0, group, tag)
        _exchange(None, 0, flat, gr(rank + 1), group, tag)
        return
    if rank < 2 * extra:
        _exchange(None, 0, flat, gr(rank - 1), group, tag, op)
    vrank = rank // 2 if rank < 2 * extra else rank - extra  # 0..p-1 among the remaining ranks
    real = lambda v: gr(2 * v + 1 if v < extra else v + extra)  # vrank -> global rank
    # 2. Reduce-scatter by recursive halving: in each round, partners at distance `mask` split
    #    their current range in two, each keeps one half and sends the other, then reduces the
    #    partner's copy of its half in. Partners hold the same range (they agreed on every bigger
    #    bit so far), so both compute the same split.
    lo, hi, ranges = 0, flat.numel(), []
    mask = p // 2
    while mask >= 1:
        mid = lo + (hi - lo) // 2
        keep, give = ((lo, mid), (mid, hi)) if vrank & mask == 0 else ((mid, hi), (lo, mid))
        ranges.append((lo, hi))
        peer = real(vrank ^ mask)
        _exchange(flat[give[0] : give[1]], peer, flat[keep[0] : keep[1]], peer, group, tag, op)
        lo, hi = keep
        mask //= 2
    if op == AVG:
        flat[lo:hi].div_(n)
    # 3. All-gather by recursive doubling: retrace the rounds backwards; each time swap our
    #    finished range for the partner's, doubling what we hold.
    mask = 1
    for plo, phi in reversed(ranges):
        peer = real(vrank ^ mask)
        other = (hi, phi) if lo == plo else (plo, lo)
        _exchange(flat[lo:hi], peer, flat[other[0] : other[1]], peer, group, tag)
        lo, hi = plo, phi
        mask *= 2
    # 4. Unfold: hand the result back to the even rank that sat out.
    if rank < 2 * extra:
        _exchange(flat, gr(rank - 1), None, 0, group, tag)


def halving_doubling_all_reduce(tensor: torch.Tensor, op=SUM, group=None, tag: int | None = None) -> torch.Tensor:
    """Rabenseifner's all-reduce: reduce-scatter by recursive halving, all-gather by recursive doubling.

    Any world size: if n is not a power of two, the first 2(n-p) ranks fold pairwise first
    (even sends its tensor to odd) and unfold at the end, so p ranks run the core algorithm.
    Args/returns/errors: as `collectives.all_reduce`.
    Cost per core rank: 2*log2(p) messages (more if pieces exceed SEGMENT_BYTES); bytes sent
        = sum over rounds of the half given away ~= (p-1)/p * N*b, twice (reduce-scatter,
        all-gather). A folding pair adds N*b each way (the odd rank also sends N*b back).
    Source: Thakur, Rabenseifner & Gropp 2005, section 4.5.
    """
    group, tag = check(tensor, op, group, tag)
    _cpu_only(tensor, "halving_doubling_all_reduce")
    _halving_doubling(tensor.view(-1), group, tag, op)
    return tensor
