"""What the link costs: step time against link rate on 2 emulated nodes, split into compute and exposed communication.

    python -m experiments.bench.link --out runs/bench/link                       # everything (root; about 30 min)
    python -m experiments.bench.link --measure rates --rates 1gbit --out runs/l1 # one rate (a few minutes)
    python -m experiments.bench.link --measure caps --out runs/lc                # the bucket-cap sweep at 1 Gbit/s
    python -m experiments.bench.link --quick --out runs/bench/link               # tiny model, 2 rates, seconds

Every measurement runs on the emulated cluster (experiments/cluster/: 2 nodes x 1 rank, each node
a network namespace pinned to its own core, joined by links shaped to the rate; needs root), one
launch per link rate (a `Cluster` of experiments/launch.py given to each launch). Inside a launch, the
configurations take turns, one training step each (common.wrappers.timed_step: experiments/step.py's optimizer step,
AdamW, minilm-l6, micro-batch 16 x 64), in an order that rotates every round, as in the step part,
so every figure is a ratio of steps of one run; a round's time is the slowest rank's.

--measure (comma-separated; default all four):
- rates: for each --rates link (0.5, 1, 2.5, 10 Gbit/s and unshaped), torch's DDP ("native"),
  ours all dense ("ours-dense"), ours at its defaults (the sparse embedding exchange, "ours"),
  both with the fp16 and bf16 compression hooks (a hook sees whole buckets: ours then sends the
  embedding dense too), and the *compute-only* step: the same step with every micro-batch under
  `no_sync()`, so nothing is sent (`timed_step(sync=False)`): the limit no DDP can beat. Exposed
  communication = step - compute-only, in the same round; hidden = 1 - exposed / (the link time
  of the bytes sent, at the rate).
- caps: at 1 Gbit/s, native and ours at bucket caps 1 .. 100 MiB (every bucket, the first
  included), beside compute-only: where the step time has its minimum.
- collectives: at 1 Gbit/s, gloo's all-reduce against our ring, naive and halving-doubling
  (the allreduce part's worker) at 1 and 25 MiB.
- main: the main job (`experiments.compare`, minilm-l6, 4,000 rows, 1 epoch) on 2 nodes at
  1 Gbit/s: its table, speedup over 1 process included (the 1-process run is the same as on one node).

Written to --out: link.json and link.md (and main/comparison.md with `main`).
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from experiments.launch import Cluster

from .accuracy import DATA_DIR
from .common.intervals import paired_ratios, slowest_median
from .common.launch import compare_flags, launch_ranks, run_command
from .common.report import part_main, write_result
from .common.wrappers import bytes_per_step, compress_hook, model_and_batches, rotated, timed_step, wrap

RATES = ("500mbit", "1gbit", "2500mbit", "10gbit", "none")
MEASURES = ("rates", "caps", "collectives", "main")
# name -> (wrapper in common.wrappers.IMPLS, sparse_embeddings, comm hook or None); "compute-only" apart
CONFIGS = {
    "native": ("native", False, None),
    "native-fp16": ("native", False, "fp16"),
    "native-bf16": ("native", False, "bf16"),
    "ours-dense": ("scratch-torch", False, None),
    "ours": ("scratch-torch", "auto", None),
    "ours-fp16": ("scratch-torch", "auto", "fp16"),
    "ours-bf16": ("scratch-torch", "auto", "bf16"),
}
COMPUTE_ONLY = "compute-only"
GIGABIT = Cluster(2, 1, "1gbit")  # 2 nodes x 1 rank at 1 Gbit/s: where the caps, collectives and main job run
CAPS_MB = (1, 2.5, 5, 10, 25, 100)
FULL = dict(model="minilm-l6", steps=10, warmup=2, batch_size=16, seq_len=64)
# 5 rounds: a median that one round slowed by another process (the test suite's other worker) cannot move
QUICK = dict(model="tiny", steps=5, warmup=1, batch_size=8, seq_len=32)
QUICK_RATES, QUICK_CAPS, QUICK_MEASURES = ("1gbit",), (1, 25), ("rates",)
COLLECTIVE_PLAN = [(2**20, 10), (25 * 2**20, 6)]  # (bytes, runs) for the allreduce part's worker
MAIN_JOB = ["--model", "minilm-l6", "--max-train-samples", "4000", "--max-length", "64"]  # the README's defaults


def build(name: str, base, cap_mb: float | None):
    """One configuration's model: a deep copy of `base` wrapped as CONFIGS[name] says."""
    impl, sparse, hook = CONFIGS[name]
    model = wrap(impl, copy.deepcopy(base), cap_mb, record=False, sparse_embeddings=sparse)[0]
    if hook:
        model.register_comm_hook(None, compress_hook(impl, hook))  # impl: native or one of ours
    return model


def worker(configs: list, model: str, steps: int, warmup: int, batch_size: int, seq_len: int, **kw) -> dict:
    """One rank: every configuration one step per round, the order rotated; seconds per step.

    `configs`: [name, cap MiB or None] pairs, name in CONFIGS or "compute-only" (native DDP's
    wrapper, every micro-batch under no_sync); `kw`: show_progress (rank 0's bar).
    Returns {"times_s": {key: [s]}, "backward_s",
    "sent_bytes": {key: bytes one rank sends per synced step}}, key = "name" or "name@cap".
    """
    import torch.distributed as dist

    base, batches = model_and_batches(model, warmup + steps, batch_size, seq_len, seed=dist.get_rank())
    keys = [name if cap is None else f"{name}@{cap:g}" for name, cap in configs]
    models = {k: build("native" if name == COMPUTE_ONLY else name, base, cap) for k, (name, cap) in zip(keys, configs)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}
    times, backward = {k: [] for k in keys}, {k: [] for k in keys}
    for i, batch in enumerate(tqdm(batches, desc="link", unit="round", disable=not kw.get("show_progress"))):
        for k in rotated(keys, i):
            t = timed_step(models[k], opts[k], [batch], sync=not k.startswith(COMPUTE_ONLY))
            if i >= warmup:
                times[k].append(t["end"] - t["start"])
                backward[k].append(sum(b - a for kind, a, b in t["intervals"] if kind == "backward"))
    sent = {}
    for k, (name, _) in zip(keys, configs):
        if name == COMPUTE_ONLY:
            sent[k] = 0.0
            continue
        impl, _, hook = CONFIGS[name]
        sent[k] = bytes_per_step(impl, models[k])["sent"] * (0.5 if hook else 1.0)  # 16-bit on the wire
    return {"times_s": times, "backward_s": backward, "sent_bytes": sent}


def _rows(ranks: list, rate: str, reference: str = "native") -> dict:
    """Per configuration: median step ms, paired ratios to `reference` and to compute-only,
    exposed communication (ms, paired), the bytes sent and the share of their link time hidden."""
    from experiments.cluster import rate_bits_per_s

    keys = list(ranks[0]["times_s"])
    slowest = {k: [max(r["times_s"][k][s] for r in ranks) for s in range(len(ranks[0]["times_s"][k]))] for k in keys}
    compute = next(k for k in keys if k.startswith(COMPUTE_ONLY))
    ref = next((k for k in keys if reference in (k, k.split("@")[0])), compute)
    bits = rate_bits_per_s(rate)
    rows = {}
    for k in keys:
        exposed = statistics.median(t - c for t, c in zip(slowest[k], slowest[compute]))
        link_s = ranks[0]["sent_bytes"][k] * 8 / bits if bits else None
        rows[k] = {
            "rate": rate,
            "median_ms": 1e3 * statistics.median(slowest[k]),
            "vs_native": paired_ratios(slowest[k], slowest[ref]),
            "vs_compute_only": paired_ratios(slowest[k], slowest[compute]),
            "exposed_comm_ms": 1e3 * exposed,
            "backward_ms": 1e3 * slowest_median([r["backward_s"][k] for r in ranks]),
            "mib_sent_per_rank": ranks[0]["sent_bytes"][k] / 2**20,
            "link_ms": None if link_s is None else 1e3 * link_s,
            "hidden": None if not link_s else max(0.0, 1 - exposed / link_s),
            "step_ms": [1e3 * t for t in slowest[k]],
        }
    return rows


def _table(rows: list[tuple[str, dict]]) -> list[str]:
    md = [
        "| link | configuration | median step ms | vs native (paired) | vs compute-only (paired) "
        "| exposed comm ms | MiB sent per rank | link time of those bytes ms | hidden |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in rows:
        link = "-" if r["link_ms"] is None else f"{r['link_ms']:.0f}"
        hidden = "-" if r["hidden"] is None else f"{r['hidden']:.0%}"
        md.append(
            f"| {r['rate']} | {k} | {r['median_ms']:.0f} | {r['vs_native']:.3f} | {r['vs_compute_only']:.3f} | "
            f"{r['exposed_comm_ms']:.0f} | {r['mib_sent_per_rank']:.1f} | {link} | {hidden} |"
        )
    return md


def measure_rates(cfg: dict, rates, quick: bool) -> dict:
    """One cluster launch per rate, every configuration and compute-only interleaved in it."""
    configs = [[name, None] for name in (*CONFIGS, COMPUTE_ONLY)]
    out = {}
    for rate in rates:
        ranks = launch_ranks("link", 2, {**cfg, "configs": configs}, quiet=quick, cluster=Cluster(2, 1, rate))
        out[rate] = _rows(ranks, rate)
    return out


def measure_caps(cfg: dict, caps, quick: bool) -> dict:
    """At 1 Gbit/s: native and ours at each bucket cap, and compute-only, interleaved in one launch."""
    configs = [[name, float(c)] for c in caps for name in ("native", "ours")] + [[COMPUTE_ONLY, None]]
    ranks = launch_ranks("link", 2, {**cfg, "configs": configs}, quiet=quick, cluster=GIGABIT)
    return _rows(ranks, "1gbit", reference="native@25")


def measure_collectives(quick: bool) -> list[dict]:
    """At 1 Gbit/s: the allreduce part's four algorithms (its worker), median ms and busbw."""
    plan = [(2**20, 2)] if quick else COLLECTIVE_PLAN
    ranks = launch_ranks("allreduce", 2, {"plan": plan, "overlap_bytes": 0}, quiet=quick, cluster=GIGABIT)
    rows = []
    for r in ranks[0]["results"]:
        t = statistics.median(r["times_s"])
        gloo = next(x for x in ranks[0]["results"] if x["algorithm"] == "gloo" and x["bytes"] == r["bytes"])
        rows.append(
            {
                "algorithm": r["algorithm"],
                "bytes": r["bytes"],
                "median_ms": 1e3 * t,
                "vs_gloo": paired_ratios(r["times_s"], gloo["times_s"]),
                "busbw_Gbit_s": r["bytes"] * 8 / t / 1e9,  # 2(n-1)/n = 1 for 2 ranks
            }
        )
    return rows


def measure_main(out_dir: Path, quick: bool, data_dir: Path) -> dict:
    """The main job on 2 nodes at 1 Gbit/s (experiments.compare --cluster 2x1 --link 1gbit): its table."""
    import json

    main_dir = out_dir / "main"
    job = ["--model", "tiny", "--max-train-samples", "64", "--max-eval-samples", "32"] if quick else MAIN_JOB
    cmd = [sys.executable, "-m", "experiments.compare", *compare_flags(GIGABIT), "--out", str(main_dir)]
    run_command([*cmd, "--data-dir", str(data_dir), *job], quiet=quick)
    md = (main_dir / "comparison.md").read_text()
    return {"table": md, "runs": json.loads((main_dir / "comparison.json").read_text())["runs"]}


def measure_each(which: list[str], cfg: dict, rates, quick: bool, out_dir: Path, data_dir: Path, md: list) -> dict:
    """Each of the `which` measurements (MEASURES) on the cluster, its table appended to `md`; their data."""
    data: dict = {}
    chosen = rates
    if "rates" in which:
        data["rates"] = measure_rates(cfg, chosen, quick)
        md += ["", "**Step time against link rate**", ""]
        md += _table([(k, r) for rows in data["rates"].values() for k, r in rows.items()])
    if "caps" in which:
        data["caps"] = measure_caps(cfg, QUICK_CAPS if quick else CAPS_MB, quick)
        best = {
            impl: min((r["median_ms"], k) for k, r in data["caps"].items() if k.split("@")[0] == impl)[1]
            for impl in ("native", "ours")
        }
        data["best_cap"] = best
        md += ["", "**Bucket cap at 1 Gbit/s** (vs native: against native at 25 MiB)", ""]
        md += _table(list(data["caps"].items()))
        md += ["", "Fastest: " + ", ".join(f"{impl} at {k.split('@')[1]} MiB" for impl, k in best.items())]
    if "collectives" in which:
        data["collectives"] = measure_collectives(quick)
        md += ["", "**All-reduce algorithms at 1 Gbit/s**", ""]
        md += ["| algorithm | size | median ms | vs gloo (paired) | bus bandwidth Gbit/s |", "|---|---|---|---|---|"]
        md += [
            f"| {r['algorithm']} | {r['bytes'] / 2**20:g} MiB | {r['median_ms']:.1f} | {r['vs_gloo']:.2f} | "
            f"{r['busbw_Gbit_s']:.2f} |"
            for r in data["collectives"]
        ]
    if "main" in which:
        data["main"] = measure_main(out_dir, quick, data_dir)
        md += ["", "**The main job on 2 nodes at 1 Gbit/s**", "", data["main"]["table"]]
    return data


def run(
    out_dir: Path,
    quick: bool = False,
    measure: str | None = None,
    rates: str = ",".join(RATES),
    data_dir: Path = DATA_DIR,
    cluster: Cluster | None = None,
) -> dict:
    """Run the `measure` parts (comma-separated MEASURES; None: all, quick: rates at 1 Gbit/s only)
    on the emulated cluster, then write link.json and link.md (`cluster` is not used: this part makes
    its own, 2 nodes x 1 rank at each rate).

    Raises: ClusterSetupError at once without root, namespaces, `ip` or `tc` (what is missing);
    UsageError for an unknown `measure` or a bad rate.
    """
    from distrinews.errors import UsageError
    from experiments.cluster import check_environment

    check_environment()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    measure = measure or ",".join(QUICK_MEASURES if quick else MEASURES)
    which = [m.strip() for m in measure.split(",") if m.strip()]
    if set(which) - set(MEASURES) or not which:
        raise UsageError(f"--measure {measure!r}: choose from {', '.join(MEASURES)}")
    cfg = QUICK if quick else FULL
    chosen = QUICK_RATES if quick else tuple(r.strip() for r in rates.split(",") if r.strip())
    data: dict = {"config": cfg}
    md = [
        f"2 nodes x 1 rank (each node one core), gloo, {cfg['model']}, micro-batch {cfg['batch_size']} x "
        f"{cfg['seq_len']} tokens, AdamW, each DDP at its defaults (torch's 25 MiB buckets, first 1 MiB); "
        f"{cfg['steps']} interleaved rounds (after {cfg['warmup']} warm-up) per launch, slowest rank per round; "
        "every ratio is paired: two configurations' steps in the same round.",
    ]
    data.update(measure_each(which, cfg, chosen, quick, out_dir, Path(data_dir), md))
    where = {
        "nodes": 2,
        "nproc_per_node": 1,
        "link": ",".join(chosen),
        "emulated": True,
        "description": f"2 nodes x 1 rank, links {', '.join(chosen)} (emulated cluster, one launch per rate)",
    }
    return write_result(out_dir, "link", md, data, topology=where, **{k: v for k, v in data.items() if k != "config"})


def _arguments(p) -> None:
    p.add_argument("--measure", default=None, help=f"comma-separated subset of {', '.join(MEASURES)} (default: all)")
    p.add_argument("--rates", default=",".join(RATES), help="link rates for 'rates' (tc units, or none)")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="AG News CSVs, for 'main'")


def main(argv=None) -> None:
    part_main("link", __doc__, run, argv, _arguments)


if __name__ == "__main__":
    main()
