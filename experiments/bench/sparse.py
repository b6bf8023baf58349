"""Where the sparse embedding exchange stops paying: its time against the dense all-reduce's.

    python -m experiments.bench.sparse --out runs/bench/sparse            # 2 and 4 ranks, minutes
    python -m experiments.bench.sparse --quick --out runs/bench/sparse    # a small table, seconds

The table is all-MiniLM-L6's word embedding (30,522 x 384 fp32, 46.9 MB). On every rank a real
`nn.Embedding` looks up k distinct random rows (another set on each rank) and backward gives their
gradient; then `ddp_from_scratch.sparse.exchange` averages it over the ranks, forced one way or the
other: "sparse" (all-gather of counts, row indices and rows; scatter-add) or "dense" (the whole
gradient / n, all-reduced, as its bucket would be). Both with `dist.all_reduce`/`all_gather`
("torch") and with our ring ("ring"). Each time is the slowest rank's, after a barrier, median over
runs. Reported per k: the bytes each rank sends in the sparse exchange as a share of the dense
ring all-reduce's, (n-1) k (D b + 8) / (2 (n-1)/n V D b), and sparse time / dense time. The
break-even share is where that time ratio crosses 1 (linear interpolation between measured
points); sparse.py's BREAK_EVEN, the share below which "auto" picks sparse, is set under it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

from experiments.launch import Cluster

from .common.intervals import slowest_median
from .common.launch import launch_ranks
from .common.report import network, part_main, write_result

FULL = dict(vocab=30522, dim=384, fractions=[0.01, 0.03, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], runs=5)
QUICK = dict(vocab=4000, dim=32, fractions=[0.02, 0.5], runs=2)
ALGORITHMS = ("torch", "ring")


def worker(vocab: int, dim: int, fractions: list[float], runs: int, show_progress: bool = False) -> list[dict]:
    """One rank: for each algorithm and row count, `runs` timed sparse and dense exchanges (seconds)."""
    import torch.distributed as dist

    from ddp_from_scratch.comm_hooks import make_comm_state
    from ddp_from_scratch.sparse import EmbeddingRows, exchange

    rank, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    emb = nn.Embedding(vocab, dim)
    table = EmbeddingRows(emb)
    g = torch.Generator().manual_seed(rank)
    out = []
    for algorithm in ALGORITHMS:
        comm = make_comm_state(None, algorithm)
        for frac in fractions:
            k = max(1, int(frac * vocab))
            times = {"sparse": [], "dense": []}
            sent = {}
            for _ in range(runs):
                for mode, share in (("sparse", float("inf")), ("dense", 0.0)):  # forced either way
                    emb.weight.grad = None
                    emb(torch.randperm(vocab, generator=g)[:k]).sum().backward()  # k rows with a gradient
                    dist.barrier()
                    t0 = time.perf_counter()
                    rec = exchange(table, comm, rank, "words", break_even=share)
                    times[mode].append(time.perf_counter() - t0)
                    assert rec["mode"] == mode, rec
                    sent[mode] = rec["sent_bytes"]
            out.append(
                {"algorithm": algorithm, "n": n, "k": k, "fraction": k / vocab, "times_s": times, "sent_bytes": sent}
            )
    return out


def break_even(points: list[tuple[float, float]]) -> float | None:
    """The byte share where time ratio sparse/dense first reaches 1, interpolated; None if it never does.

    `points`: (byte share, time ratio), sorted by share.
    """
    for (s0, r0), (s1, r1) in zip(points, points[1:]):
        if r0 < 1 <= r1:
            return s0 + (1 - r0) * (s1 - s0) / (r1 - r0)
    return points[0][0] if points and points[0][1] >= 1 else None


def run(out_dir: Path, quick: bool = False, nprocs: str = "2,4", cluster: Cluster | None = None) -> dict:
    """Launch the ranks for each world size, then write sparse.json and sparse.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = QUICK if quick else FULL
    worlds = [2] if quick else [int(x) for x in str(nprocs).split(",")]
    rows, crossings = [], {}
    for n in worlds:
        ranks = launch_ranks("sparse", n, cfg, quiet=quick, cluster=cluster)
        for i, r in enumerate(ranks[0]):
            t = {m: slowest_median([rk[i]["times_s"][m] for rk in ranks]) for m in ("sparse", "dense")}
            share = r["sent_bytes"]["sparse"] / r["sent_bytes"]["dense"]
            rows.append(
                {
                    **{k: r[k] for k in ("algorithm", "n", "k", "fraction")},
                    "byte_share": share,
                    "sparse_ms": 1e3 * t["sparse"],
                    "dense_ms": 1e3 * t["dense"],
                    "ratio": t["sparse"] / t["dense"],
                }
            )
        for algorithm in ALGORITHMS:
            pts = sorted((x["byte_share"], x["ratio"]) for x in rows if x["n"] == n and x["algorithm"] == algorithm)
            crossings[f"{algorithm}, {n} ranks"] = break_even(pts)
    md = [
        f"Word embedding {cfg['vocab']} x {cfg['dim']} fp32 ({cfg['vocab'] * cfg['dim'] * 4 / 1e6:.1f} MB), gloo over "
        f"{network(cluster)}, k distinct rows with a gradient on each rank (another set per rank), median of "
        f"{cfg['runs']} runs of the slowest rank.",
        "",
        "| ranks | algorithm | rows k (share of table) | sparse bytes / dense bytes | sparse ms | dense ms "
        "| sparse / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        md.append(
            f"| {x['n']} | {x['algorithm']} | {x['k']} ({x['fraction']:.0%}) | {x['byte_share']:.2f} | "
            f"{x['sparse_ms']:.1f} | {x['dense_ms']:.1f} | {x['ratio']:.2f} |"
        )
    md += [
        "",
        "Break-even byte share (sparse as slow as dense): "
        + ", ".join(f"{k} {'not reached' if v is None else f'{v:.2f}'}" for k, v in crossings.items()),
    ]
    return write_result(
        out_dir,
        "sparse",
        md,
        {"config": cfg, "rows": rows, "break_even": crossings},
        rows=rows,
        break_even=crossings,
        cluster=cluster,
    )


def main(argv=None) -> None:
    part_main("sparse", __doc__, run, argv, lambda p: p.add_argument("--nprocs", default="2,4", help="world sizes"))


if __name__ == "__main__":
    main()
