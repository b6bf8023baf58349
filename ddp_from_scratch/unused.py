"""Parameters without a gradient: what forward did not use, and the error when that is not allowed.

A parameter the forward pass did not use gets no gradient, so its gradient hook never fires, its
bucket never fills, and that bucket's all-reduce would never start: the rank would wait forever.
Two ways out, both from torch's reducer (reducer.cpp; Li et al., VLDB 2020, section 3.2.3):

- `find_unused_parameters=True`: after each forward, walk the autograd graph from the output
  (`params_reached_by`); the parameters it does not reach (`unused_parameters`) are marked ready
  at the first gradient hook, contributing their current `.grad` (usually None, i.e. zeros). At
  the end of backward the ranks all-reduce a per-parameter "got a gradient" count; a parameter
  no rank used keeps its `.grad` untouched (None stays None), any other gets the average
  (locally unused ranks contributed zeros, and the sum is still divided by world size).
- without it: every parameter must get a gradient on every rank, or every rank raises
  (`missing_gradients_error`).

The counts are exchanged *every* step, also without find_unused_parameters. torch skips that
all-reduce then (reducer.cpp, "Note [Skip allreducing local_used_map_dev]") and notices a missing
gradient only at the next forward ("Expected to have finished reduction in the prior
iteration"); if only one rank misses a gradient, its peers have launched every bucket and wait
for it until the process-group timeout. One all-reduce of a few hundred bytes per step buys an
immediate, identical error on every rank. The reducer (reducer.py, after debug.py and sparse.py)
does the exchange; this file holds the graph walk and the error.
"""

from __future__ import annotations

import dataclasses

import torch


def params_reached_by(output) -> set[int]:
    """ids of the parameters that backward from `output` will reach.

    `output` is a tensor or a dict/list/tuple/dataclass/ModelOutput of tensors (nested; torch's
    `_find_tensors` walks the same kinds). We walk the autograd graph
    from each tensor's `grad_fn`; a leaf parameter shows up as the `variable` of an
    AccumulateGrad node. torch's DDP does this traversal when `find_unused_parameters=True`
    (reducer.cpp, `prepare_for_backward`).
    """
    tensors, stack = [], [output]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            tensors.append(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            stack.extend(getattr(x, f.name) for f in dataclasses.fields(x))
    reached, seen = set(), set()  # ids of parameters; autograd nodes already visited
    nodes = [t.grad_fn for t in tensors if t.grad_fn is not None]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad
            reached.add(id(node.variable))
        nodes.extend(fn for fn, _ in node.next_functions)
    return reached


def unused_parameters(params: list[torch.Tensor], output) -> list[int]:
    """Indices into `params` of the parameters that backward from `output` will not reach."""
    reached = params_reached_by(output)
    return [i for i, p in enumerate(params) if id(p) not in reached]


def missing_gradients_error(
    rank: int, names: list[str], counts: list[int], expected: int, missing_here: list[int]
) -> RuntimeError | None:
    """The error every rank raises when some parameter got no gradient on some rank, or None.

    Args:
        rank: this rank (for the message).
        names: parameter names, index i = parameter i.
        counts: per parameter, on how many ranks it got a gradient this step (summed over ranks).
        expected: ranks that ran this backward (the world size, or fewer under join()).
        missing_here: indices of the parameters that got none on this rank.
    """
    missing = [(names[i], expected - c) for i, c in enumerate(counts) if c < expected]
    if not missing:
        return None
    mine = [names[i] for i in missing_here]
    listing = ", ".join(f"{name} (on {k} of {expected} ranks)" for name, k in missing)
    return RuntimeError(
        f"DistributedDataParallel (rank {rank}): these parameters got no gradient in this backward pass: "
        f"{listing}. On this rank: {mine or 'none'}. Every parameter that requires grad must get a gradient "
        "on every rank each step, or its bucket could never be all-reduced. If they are legitimately unused, "
        "wrap with find_unused_parameters=True; if they should never train, set requires_grad=False."
    )
