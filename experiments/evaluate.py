"""Distributed evaluation: every example counted exactly once across ranks.

The training sampler pads so all ranks get the same number of batches; evaluation
must not pad (a repeated example would be counted twice). Rank r takes examples
r, r+N, r+2N, ... of the split, runs the *inner* model (no DDP wrapper, so ranks
with one batch fewer never leave a peer waiting in a collective), and the per-rank
confusion matrices and loss sums are added up with one all-reduce. With `by_length`, each rank
runs its shard longest first (less padding, and an out-of-memory error shows at once), still
every example exactly once.

FSDP is the exception: there every forward all-gathers each unit's parameters, so every rank
must run the same number of forwards or the one with more waits forever for the others. With
`same_forwards`, a rank whose shard has one batch fewer runs one more forward on a batch of the
split's first example and counts nothing of it (a few examples of extra compute, no hang).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import unwrap
from .distributed import DistEnv, all_reduce_sum
from .length_grouping import lengths_of
from .precision import autocast


def evaluate(
    model,
    dataset,
    collate_fn,
    env: DistEnv,
    batch_size: int = 64,
    num_labels: int = 4,
    desc: str = "eval",
    precision: str = "fp32",
    by_length: bool = False,
    same_forwards: bool = False,
) -> dict:
    """Accuracy, mean loss and confusion matrix of `model` on `dataset`, over all ranks.

    Args:
        dataset: tokenized split with `input_ids`, `attention_mask`, `labels`.
        batch_size: examples per forward pass on each rank.
        precision: "fp32", "fp16" or "bf16": the autocast of training (precision.py).
        by_length: run this rank's shard sorted by length, longest first (--group-by-length).
        same_forwards: every rank runs the same number of forwards (FSDP: see the module docstring).

    Returns:
        {"accuracy": float in [0, 1], "loss": mean cross-entropy (nats), "n": examples
        counted (= len(dataset)), "confusion": list of lists, [true][predicted] counts}.
    """
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    shard = list(range(env.rank, len(dataset), env.world_size))  # disjoint, complete, no padding
    if by_length:  # the same examples in another order: the counts and sums do not change
        lengths = lengths_of(dataset)
        shard.sort(key=lambda i: -lengths[i])
    loader = DataLoader(dataset, batch_size=batch_size, sampler=shard, collate_fn=collate_fn)
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.int64, device=env.device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=env.device)
    # FSDP's hooks gather under no_grad; inference tensors would be refused by FSDP2's in-place copies
    with torch.no_grad() if same_forwards else torch.inference_mode():
        for batch in tqdm(loader, desc=desc, disable=not env.is_main, leave=False):
            batch = {k: v.to(env.device) for k, v in batch.items()}
            with autocast(precision, env.device):
                out = inner(**batch)
            pred = out.logits.argmax(dim=-1)
            confusion.index_put_((batch["labels"], pred), torch.ones_like(pred), accumulate=True)
            loss_sum += out.loss.double() * len(pred)
        longest = math.ceil(math.ceil(len(dataset) / env.world_size) / batch_size)  # rank 0's batches
        for _ in range(longest - len(loader) if same_forwards else 0):  # the peers' forwards: counted by nobody
            batch = {k: v.to(env.device) for k, v in collate_fn([dataset[0]]).items()}
            with autocast(precision, env.device):
                inner(**batch)
    all_reduce_sum(confusion, env)
    all_reduce_sum(loss_sum, env)
    inner.train(was_training)
    n = int(confusion.sum())
    return {
        "accuracy": float(confusion.trace()) / max(n, 1),
        "loss": float(loss_sum) / max(n, 1),
        "n": n,
        "confusion": confusion.cpu().tolist(),
    }
