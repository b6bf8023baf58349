"""How far apart two correct computations of the same average may be: the bounds the equivalence tests use.

Reordering (the DDPs against each other). Every rank computes its own gradient g_r bit for bit
the same way whichever wrapper it runs under (same parameters, same micro-batch, same kernels);
the wrappers differ only in how the n values are averaged: which buffer a gradient sits in, so
which order gloo or our ring adds the n terms, and whether each term is divided by n before the
sum or the sum after. Let S = sum_r |g_r| / n. Dividing each term first, the n divisions round by
at most u = eps/2 of each term (u*S in all) and the n-1 additions by u of a partial sum of at most S;
summing first, the additions round by u of at most n*S, and the one division by n scales that back
and adds u of the result. Either way the average lies within n*u*S of the exact one, and two orders
within n*eps*S
(Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., §4.2, to first order in u;
eps is the dtype's machine epsilon, 2^-23 for float32). With n = 2 there is one addition, and
a + b == b + a: the results must be identical, bit for bit (division by 2 is exact).

The bound is elementwise and uses the magnitudes of the terms, not of the result: where the
ranks' gradients cancel, the average is small but its rounding is not. It holds on any CPU,
whatever the kernels, because it depends only on the gradients each rank contributed.

What it cannot see: an optimizer step that amplifies a difference (AdamW divides by sqrt(v) + eps,
so a gradient near zero turns a rounding difference of 1e-13 into an update difference of up to
lr * 1e-13 / 1e-8). So the tests compare gradients at the same parameters, before any step.

A planted bug (a missing division by the world size, a bucket never reduced, one rank's gradient
dropped) moves an element by a sizable fraction of S, far above n*eps*S: `assert_can_fail`
checks that each comparison has that room.

Clipping (`clip_bounds`): two implementations of clip-by-global-norm compute the float32 norm in
different orders, so the same gradients are scaled by coefficients a few hundred ulps apart;
`clip_bounds` derives how far.

One process (`float64_bounds`, FLOAT64_RTOL below): different batch shapes, so different kernels
and sums everywhere, compared in float64.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

# One process against DDP (different batch shapes, so different kernels and sums everywhere) is
# compared in float64, normwise: float64's unit roundoff is 2^-53; a gradient of the small test
# models passes through fewer than 2^6 operations on any path, each a sum of at most 2^9 terms
# (batch 12, width 64, 190-token vocabulary), so the first-order bound (Higham §3.1: gamma_k = k*u
# per sum) is about 2^15 * 2^-53 = 2^-38 of the largest magnitude in play, which we take as the
# largest per-sample gradient element M. We allow 2^-30 * M (256x that), still 10^8 below what a
# planted bug does. Normwise, not elementwise: a gradient that cancels to exactly zero in exact
# arithmetic (a key bias under softmax) keeps the rounding of the O(M) terms it cancelled.
FLOAT64_RTOL = 2.0**-30


def reordering_bound(terms: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """n * eps * S elementwise (module docstring), plus n smallest normals for gradients near underflow.

    Args:
        terms: S, sum over ranks of |g_r| / n, any float dtype (float64 keeps its own sum exact enough).
        n: the world size.
        dtype: the dtype the averages were computed in (its eps).
    """
    info = torch.finfo(dtype)
    return n * info.eps * terms.double() + n * info.tiny


def gradient_terms(module: nn.Module, loss_fn, n: int) -> dict[str, torch.Tensor]:
    """S per parameter: sum over ranks of |g_r| / n, from a plain copy of `module` (float64, all-reduced).

    `loss_fn(module)` returns this rank's loss on its own micro-batch. Called on every rank (an all-reduce
    per parameter); parameters without a gradient are left out.
    """
    import copy

    local = copy.deepcopy(module)
    local.zero_grad(set_to_none=True)
    loss_fn(local).backward()
    out = {}
    for name, p in local.named_parameters():
        if p.grad is None:
            continue
        t = p.grad.double().abs() / n
        dist.all_reduce(t)
        out[name] = t
    return out


def terms_of(local: list[dict], n: int) -> dict[str, torch.Tensor]:
    """S per parameter, float64, from every rank's own gradient as the ranks saved it (no collective: for
    the test process, or where ranks run different numbers of steps, as under join).

    Args:
        local: per rank, name -> that rank's local gradient before averaging (None: the rank had none, 0).
        n: the world size (the divisor, also for ranks that contributed nothing).
    """
    names = sorted({k for grads in local for k, g in grads.items() if g is not None})
    out = {}
    for k in names:
        got = [g[k] for g in local if g.get(k) is not None]
        out[k] = sum(g.double().abs() for g in got) / n
    return out


def clip_bounds(clipped: dict, norm: float, max_norm: float, reorder: dict | None, n: int) -> dict:
    """How far a gradient clipped by its global 2-norm may be from `clipped`, the reference's, float32.

    Both sides clip (nearly) the same averaged gradient g (elementwise within `reorder` of each
    other; None: bit for bit) by c = min(1, max_norm / (norm + 1e-6)), but compute the norm in
    different orders (per tensor then across tensors: torch.nn.utils.clip_grad_norm_; per shard
    then across ranks: flat_param.clip_grad_norm_). Each is a float32 sum of the N squares with
    at most K = N + 2P + 2n + 16 roundings on any path (the squares, the sums, a sqrt and a square
    per tensor or shard, the sum over P tensors and n ranks, the final sqrt): each norm lies within
    K*u of its own gradient's exact norm (Higham §4.2, any summation order; u = eps/2), and the two
    exact norms within ||R||_2 of each other (R the elementwise reordering bound). The two
    coefficients differ by a relative rho = K*eps + ||R||_2 / norm + 2*eps (the add and the division
    rounded on each side), and one product c*g rounded on each side adds eps: an element of the
    clipped gradient is within c*R*(1 + rho) + (rho + 2*eps) * |c*g| of the reference's.
    For the ~5,000 elements of the sharded tests' model, rho is about 6e-4: a bug that changes a
    gradient's direction (a rank dropped, a bucket left unreduced) moves it by a sizable fraction
    of itself and lands far outside. A missing 1/n does not: clipping divides it out again; the
    unclipped comparisons guard that.

    Args:
        clipped: name -> the reference's clipped gradient (float32).
        norm: the reference's total norm before clipping (what clip_grad_norm_ returned).
        reorder: name -> elementwise bound between the two unclipped gradients, or None (identical).
        n: the world size.
    """
    eps = torch.finfo(torch.float32).eps
    n_elements = sum(g.numel() for g in clipped.values())
    k = n_elements + 2 * len(clipped) + 2 * n + 16
    c = min(1.0, max_norm / (norm + 1e-6))
    r2 = 0.0 if reorder is None else float(sum(float((r.double() ** 2).sum()) for r in reorder.values())) ** 0.5
    rho = k * eps + r2 / norm + 2 * eps
    out = {}
    for name, g in clipped.items():
        r = 0.0 if reorder is None else reorder[name]
        out[name] = c * r * (1 + rho) + (rho + 2 * eps) * g.double().abs()
    return out


def mean_magnitudes(module: nn.Module, losses: list) -> dict[str, torch.Tensor]:
    """sum over the k pieces of |gradient of piece i| / k, float64, per parameter with a gradient:
    the magnitudes a one-process gradient adds up (`losses`: k callables, loss_i(module) -> scalar).
    Clears `module`'s gradients before and after."""
    out: dict[str, torch.Tensor] = {}
    for loss in losses:
        module.zero_grad(set_to_none=True)
        loss(module).backward()
        for name, p in module.named_parameters():
            if p.grad is not None:
                t = p.grad.double().abs() / len(losses)
                out[name] = out[name] + t if name in out else t
    module.zero_grad(set_to_none=True)
    return out


def float64_bounds(terms: dict) -> dict[str, torch.Tensor]:
    """FLOAT64_RTOL times the largest of `terms` (mean_magnitudes), normwise, for every element."""
    scale = max(float(t.max()) for t in terms.values())
    return {k: torch.full_like(t, FLOAT64_RTOL * scale) for k, t in terms.items()}


def assert_reordered(got: dict, want: dict, terms: dict, n: int, where) -> None:
    """`got` and `want` (name -> averaged gradient) are the same average in two summation orders.

    Identical for n = 2; within `reordering_bound` otherwise. Raises AssertionError naming the
    parameter, its largest difference and the bound there.
    """
    assert got.keys() == want.keys(), (where, sorted(got.keys() ^ want.keys()))
    for k, ref in want.items():
        if n == 2:
            assert torch.equal(got[k], ref), (
                where,
                k,
                "2 ranks: one addition, bit for bit",
                float((got[k] - ref).abs().max()),
            )
            continue
        diff = (got[k].double() - ref.double()).abs()
        bound = reordering_bound(terms[k], n, ref.dtype)
        worst = int((diff - bound).argmax())
        assert bool((diff <= bound).all()), (where, k, float(diff.flatten()[worst]), float(bound.flatten()[worst]))


def assert_within(got: dict, want: dict, bounds: dict, where) -> None:
    """Every element of got[k] within bounds[k] of want[k] (tensors of the same shape)."""
    assert got.keys() == want.keys(), (where, sorted(got.keys() ^ want.keys()))
    for k, ref in want.items():
        diff = (got[k].double() - ref.double()).abs()
        worst = int((diff - bounds[k]).argmax())
        assert bool((diff <= bounds[k]).all()), (
            where,
            k,
            float(diff.flatten()[worst]),
            float(bounds[k].flatten()[worst]),
        )


def assert_can_fail(grads: dict, bounds: dict, where, room: float = 1e3) -> None:
    """The comparison can fail: some gradient element is `room` times its bound, so a bug that changes
    gradients by a fraction of themselves (a missing 1/n, a dropped rank) lands outside it."""
    best = max(float((g.double().abs() / bounds[k]).max()) for k, g in grads.items())
    assert best > room, (where, "the bound is as large as the gradients: the test could not fail", best)
