"""Interval arithmetic of the measurements: union lengths, overlap of communication with backward,
medians over ranks and rounds. Pure functions of perf_counter seconds; no processes. The union and
the hidden part of intervals are the core's (experiments/comm_timing.py, which training uses too).
"""

from __future__ import annotations

import statistics

from experiments.comm_timing import hidden_length, union_length  # the core's arithmetic, used here too


def overlap(events: list[dict], impl: str) -> dict:
    """Share of all-reduce time hidden behind backward compute, over all ranks and steps.

    For each (rank, step): communication = union of the buckets' [launch, done]; the backward's
    compute ends when the last bucket is launched (its last gradient was just computed).
    Hidden = communication before that moment and after backward started.

    The last bucket's all-reduce starts when there is no compute left to hide it behind, so
    `overlap` can never exceed 1 - (its share of the communication). `last_bucket_ms_per_step`
    is that bucket's time and `overlap_of_earlier` the share hidden of all the *other* buckets'
    communication (the part overlap could in principle hide).

    Args:
        events: flat dicts with "impl", "rank", "step", "kind" (forward / backward / optimizer /
            allreduce), "start", "end" (perf_counter seconds), as `wrappers.step_events` makes.
    Returns: {"overlap", "overlap_of_earlier"} (fractions 0..1), and per-step milliseconds
        "allreduce_ms_per_step", "last_bucket_ms_per_step", "forward_ms_per_step",
        "backward_ms_per_step", "optimizer_ms_per_step" (averaged over ranks and steps).
    """
    hidden = total = earlier = last = 0.0
    mine = [e for e in events if e["impl"] == impl]
    keys = {(e["rank"], e["step"]) for e in mine}
    for key in keys:
        evs = [e for e in mine if (e["rank"], e["step"]) == key]
        comm = sorted((e["start"], e["end"]) for e in evs if e["kind"] == "allreduce")
        if not comm:
            continue
        bwd_start = min(e["start"] for e in evs if e["kind"] == "backward")
        total += union_length(comm)
        earlier += union_length(comm[:-1])
        last += comm[-1][1] - comm[-1][0]
        hidden += hidden_length(comm, bwd_start, comm[-1][0])  # compute ends at the last launch
    n = max(len(keys), 1)
    per = {
        k: sum(e["end"] - e["start"] for e in mine if e["kind"] == k) / n for k in ("forward", "backward", "optimizer")
    }
    return {
        "overlap": hidden / total if total else 0.0,
        "overlap_of_earlier": hidden / earlier if earlier else 0.0,
        "allreduce_ms_per_step": 1e3 * total / n,
        "last_bucket_ms_per_step": 1e3 * last / n,
        **{f"{k}_ms_per_step": 1e3 * v for k, v in per.items()},
    }


def slowest_median(per_rank: list[list[float]]) -> float:
    """Median over runs of the slowest rank's time: `per_rank[r][j]` is rank r's seconds in run j
    (a collective is done only when every rank has its result)."""
    return statistics.median(max(run) for run in zip(*per_rank))


def paired_ratios(times: list[float], reference: list[float]) -> float:
    """Median over rounds of time / reference time in the same round: robust to the machine's drift."""
    return statistics.median(t / r for t, r in zip(times, reference))
