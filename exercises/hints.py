"""The exercises, in order, and their hints in stages: shown only when asked (`--hint`, `--hint 2`, ...).

Stage 1 says what to think about, stage 2 which tools to use, stage 3 the shape of the code in
words. No stage is the solution: the solution is the file named in each exercise's docstring,
to open once your own version passes (or when you give up).
"""

from __future__ import annotations

# name -> stages, in the order docs/exercises.md gives them (the sampler first, as in the reading order)
HINTS: dict[str, list[str]] = {
    "sampler": [
        "Every rank must pick the same permutation without talking to the others: what must the "
        "random generator's seed depend on, and what must it not depend on?",
        "torch.Generator().manual_seed(...) and torch.randperm(n, generator=...); a Python slice with a step "
        "takes every k-th element.",
        "Shuffle (or not), then make the list's length a multiple of the world size (repeat its head, or cut "
        "its tail with drop_last), then take this rank's slice. __len__ follows from the same arithmetic.",
    ],
    "step1_explicit": [
        "After backward each rank holds the gradient of its own micro-batch. Which single number, the same on "
        "every rank, should each gradient element become?",
        "dist.get_world_size(group), dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group) changes the "
        "tensor in place; Tensor.div_.",
        "Loop over the parameters in a fixed order; handle the ones that need no gradient and the ones whose "
        "gradient is still None (every rank must make the same calls in the same order).",
    ],
    "step2_hooks": [
        "The hook runs once per parameter, but the averaging must run once per backward, after the last "
        "gradient: how does the hook make sure the end-of-backward work is asked for exactly once?",
        "Variable._execution_engine.queue_callback(fn) from inside a hook; a boolean attribute already exists "
        "in __init__ for this.",
        "In the hook: ask for the callback unless already asked. In the callback: first reset what the hook "
        "set, then do exercise step1_explicit's work on self.params.",
    ],
    "step3_overlap": [
        "Communication can start as soon as one gradient is final, while backward still computes the others. "
        "What must then wait, and where?",
        "dist.all_reduce(..., async_op=True) returns a Work; Work.wait(); the end-of-backward callback from "
        "step2_hooks; the list self.works.",
        "The hook does three things (callback once, scale the gradient, launch and remember the Work); the "
        "callback waits for every Work in launch order and leaves the list empty for the next step.",
    ],
    "step4_buckets": [
        "A bucket can only be sent when all of its gradients are in it. What does each bucket need to "
        "count, and what must happen to the averaged values at the end?",
        "Bucket has views (one per parameter, into its flat buffer), pending and work; torch.div(..., out=...) "
        "writes a scaled copy; dist.all_reduce(bucket.buffer, ..., async_op=True).",
        "In the hook: callback once; copy this gradient (scaled) into its view; count down; at zero launch the "
        "bucket. In the callback: per bucket wait, copy each view back into its .grad, reset the counter and "
        "the Work.",
    ],
    "ring": [
        "Draw 3 ranks and 3 chunks on paper. In the reduce-scatter each step moves one chunk one hop and adds; "
        "which chunk must rank r send first so that it ends holding chunk r complete?",
        "dist.isend and dist.irecv (or dist.P2POp + dist.batch_isend_irecv), then .wait() on both; "
        "Tensor.tensor_split(n) gives views, so writing into a chunk writes into the tensor.",
        "Two loops of n-1 steps. Reduce-scatter: send one chunk, receive into a scratch tensor, add it into the "
        "matching chunk. All-gather: send the chunk you completed last, receive straight into place. The "
        "chunk you received at one step is the one you send at the next.",
    ],
    "bucket_plan": [
        "Buckets hold one dtype and one device each, so several buckets can be open at once. When does a "
        "bucket close, and which cap applies to it?",
        "A dict keyed by (dtype, device) holding the open bucket and its byte count; numel() * element_size().",
        "Walk `order`; add the parameter to its group's open bucket; close the bucket when its bytes reach the "
        "cap for that group's count of closed buckets; at the end close what is still open and sort by first "
        "member.",
    ],
}
