"""Memory per rank, bytes communicated and step time of DDP, ZeRO-1, ZeRO-2 and FSDP, ours and torch's.

    python -m experiments.bench.memory --out runs/bench/memory                       # minilm-l6, distilbert; 2, 4 ranks
    python -m experiments.bench.memory --models distilbert --nprocs 2 --out runs/bench/memory-d2
    python -m experiments.bench.memory --quick --out runs/bench/memory               # a tiny model, 2 ranks, seconds

Every variant trains the same randomly initialised model (same seed, same micro-batches) for a warm-up step and
`steps` timed steps on real ranks (gloo, CPU), AdamW in fp32, every parameter trainable. After the last step,
before `zero_grad`, each rank counts the bytes it holds (`storage_bytes`: distinct tensor storages, a tied or
viewed tensor once): parameters (the model's, or the shards: FSDP's flat shards, torch's DTensor local shards),
gradients (DDP's are views of its buckets, `gradient_as_bucket_view=True`), optimizer state (exp_avg, exp_avg_sq,
step). Beside them the ZeRO paper's formula (Rajbhandari et al., SC 2020, §5; fp32 AdamW: 4 + 4 + 8 bytes per
parameter Psi, sharded terms divided by the world size n):

    stage              parameters   gradients   optimizer state   total              sent per rank per step
    DDP                4 Psi        4 Psi       8 Psi             16 Psi             2 (n-1)/n 4 Psi
    ZeRO-1 (P_os)      4 Psi        4 Psi       8 Psi / n         8 Psi + 8 Psi/n    3 (n-1)/n 4 Psi
    ZeRO-2 (P_os+g)    4 Psi        4 Psi / n   8 Psi / n         4 Psi + 12 Psi/n   2 (n-1)/n 4 Psi
    FSDP (P_os+g+p)    4 Psi / n    4 Psi / n   8 Psi / n         16 Psi / n         3 (n-1)/n 4 Psi

(sent: DDP's all-reduce; ZeRO-1's all-reduce + all-gather; ZeRO-2's reduce-scatter + all-gather; FSDP's
all-gathers before forward and before backward + reduce-scatter.)
(the paper's ZeRO-1 reduce-scatters gradients, 2 Psi; ours and torch's ZeroRedundancyOptimizer keep DDP's
all-reduce and add the parameter all-gather or broadcasts: 3 Psi.) The bytes communicated are counted from the
collectives actually called during the timed steps (`CollectiveCounter` wraps `torch.distributed`'s functions;
torch's DDP all-reduces in C++, so it gets torch's own `allreduce_hook`, which calls `dist.all_reduce`): each
call's full tensor S (all-reduce: the tensor; all-gather: the output; reduce-scatter: the input; broadcast: the
tensor), and what a bandwidth-optimal (ring) algorithm makes each rank send for it: 2 (n-1)/n S for an all-reduce,
(n-1)/n S for the others. Peak RSS is the process's resident-set high-water mark (Linux VmHWM, reset through
/proc/self/clear_refs before each variant; elsewhere getrusage's, never reset) minus its RSS before the variant.
Step time: the slowest rank's median over the timed steps; ratios only compare within one run.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
from pathlib import Path

import torch
import torch.nn as nn

from experiments import parallel as P
from experiments.launch import Cluster

from .common.launch import launch_ranks
from .common.report import part_main, write_result
from .common.wrappers import device, timed_step

# every (stage, implementation) of experiments/parallel.py's table, in its order; where one is missing
# (torch's ZeRO-2), the table's `MISSING` says why in a row of its own
FULL = dict(models=["minilm-l6", "distilbert"], micro_batch=8, seq=128, steps=3)
QUICK = dict(models=["quick"], micro_batch=4, seq=16, steps=1)
LABELS = 4


# ---- what a rank holds ---------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (torch's FSDP2 parameters, gradients and state are DTensors); else `t`."""
    return t.to_local() if hasattr(t, "to_local") else t


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (None and empty tensors skipped; DTensors: their local shard).

    Two views of one storage (a tied weight, DDP's gradients in a bucket) count once, with the
    whole storage's size (`untyped_storage().nbytes()`).
    """
    seen = {}
    for t in tensors:
        if t is not None and t.numel():
            s = _local(t).untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def held_bytes(params, optim_state: dict) -> dict[str, int]:
    """{"params", "grads", "optim"}: storage bytes of `params`, of their `.grad`, and of the tensors in `optim_state`
    (an optimizer's `state`: param -> {name: tensor})."""
    params = list(params)
    state = [v for s in optim_state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "params": storage_bytes(params),
        "grads": storage_bytes(p.grad for p in params),
        "optim": storage_bytes(state),
    }


# ---- what a rank communicates --------------------------------------------------------------
class CollectiveCounter:
    """Counts the collectives called through `torch.distributed` while `counting()` is active.

    `calls[op]` and `bytes[op]` (S: the full tensor's bytes, see the module docstring) per op;
    `sent()`: bytes a ring algorithm makes this rank send for them. Patches the module attributes
    (`dist.all_reduce`, ...), which our wrappers and torch's Python code (ZeroRedundancyOptimizer,
    FSDP2, DDP's Python comm hooks) look up at call time.
    """

    OPS = (
        "all_reduce",
        "all_gather_single",
        "all_gather_into_tensor",
        "reduce_scatter_single",
        "reduce_scatter_tensor",
        "broadcast",
        "all_gather",
        "reduce_scatter",
    )

    def __init__(self, world_size: int):
        self.n = world_size
        self.active = False  # counts only while True (patched from construction on: launchers bind at build time)
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    @staticmethod
    def _size(op: str, args, kwargs, n: int) -> int:
        def arg(i, name):
            return args[i] if len(args) > i else kwargs[name]

        if op in ("all_reduce", "broadcast"):
            t = arg(0, "tensor")
        elif op in ("all_gather_single", "all_gather_into_tensor"):
            t = arg(0, "output_tensor")
        elif op in ("reduce_scatter_single", "reduce_scatter_tensor"):
            t = arg(1, "input")
        elif op == "all_gather":
            return n * _nbytes(arg(1, "tensor"))
        else:  # reduce_scatter(output, input_list)
            return sum(_nbytes(x) for x in arg(1, "input_list"))
        return _nbytes(t)

    @contextlib.contextmanager
    def counting(self):
        import torch.distributed as dist

        originals = {op: getattr(dist, op) for op in self.OPS if hasattr(dist, op)}

        def wrap(op, fn):
            def counted(*args, **kwargs):
                if not self.active:
                    return fn(*args, **kwargs)
                self.calls[op] = self.calls.get(op, 0) + 1
                self.bytes[op] = self.bytes.get(op, 0) + self._size(op, args, kwargs, self.n)
                return fn(*args, **kwargs)

            return counted

        for op, fn in originals.items():
            setattr(dist, op, wrap(op, fn))
        try:
            yield self
        finally:
            for op, fn in originals.items():
                setattr(dist, op, fn)

    def sent(self) -> float:
        f = (self.n - 1) / self.n
        return sum((2 * f if op == "all_reduce" else f) * b for op, b in self.bytes.items())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---- resident set ----------------------------------------------------------------------------
def _status(field: str) -> int | None:
    """A /proc/self/status field in bytes (VmRSS, VmHWM), None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Return freed memory to the OS and reset the high-water mark (Linux: clear_refs 5); False if it cannot."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    return _status("VmRSS") or 0


def peak_rss_bytes() -> int:
    """The resident-set high-water mark in bytes: VmHWM, or getrusage's ru_maxrss (KiB on Linux, bytes on macOS)."""
    hwm = _status("VmHWM")
    if hwm is not None:
        return hwm
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ---- the models and the step -----------------------------------------------------------------
def build(name: str) -> nn.Module:
    """A randomly initialised classifier of `name`'s real size (seed 0), dropout 0, every parameter trainable.

    minilm-l6: all-MiniLM-L6-v2's BertConfig (6 layers, hidden 384, 22.7M parameters; random weights: the
    bytes do not depend on them); distilbert: DistilBertConfig's defaults (6 layers, dim 768, 67.0M);
    quick: a 2-layer DistilBERT, dim 64, vocabulary 128, so the layers, not the embedding, hold most bytes.
    """
    from transformers import BertConfig, BertForSequenceClassification, DistilBertConfig
    from transformers import DistilBertForSequenceClassification as DistilBert

    torch.manual_seed(0)
    # every option in the one constructor call: a config rebuilt from another's to_dict() keeps that one's
    # two-label id2label, and transformers 5.0 then ignores num_labels=4 (only a warning)
    if name == "minilm-l6":
        cfg = BertConfig(
            vocab_size=30522,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            num_labels=LABELS,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return BertForSequenceClassification(cfg).train()
    common = dict(num_labels=LABELS, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
    if name == "distilbert":
        return DistilBert(DistilBertConfig(**common)).train()
    if name == "quick":
        cfg = DistilBertConfig(
            vocab_size=128, dim=64, n_layers=2, n_heads=2, hidden_dim=256, max_position_embeddings=32, **common
        )
        return DistilBert(cfg).train()
    raise ValueError(f"unknown model {name!r}: choose minilm-l6, distilbert or quick")


def batch_of(step: int, rank: int, vocab: int, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s token ids (batch, seq) int64 and labels (batch,) int64 for `step`: the same in every variant."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(1, vocab, (batch, seq), generator=g), torch.randint(0, LABELS, (batch,), generator=g)


def wrap(stage: str, impl: str, model: nn.Module, lr: float = 1e-3):
    """(wrapped model, optimizer, what this rank holds: () -> {"params", "grads", "optim"} bytes), built by
    experiments/parallel.py's table with gradients as views of DDP's buckets and torch's DDP all-reducing
    through its Python `allreduce_hook` (so that `CollectiveCounter` sees its all-reduces)."""
    options = P.Options(lr=lr, gradient_as_bucket_view=True, python_allreduce=True)
    run = P.build(P.lookup(stage, impl), model, options, device())

    def held() -> dict[str, int]:
        params, with_grads, state = run.held()
        return held_bytes(with_grads, state) | {"params": storage_bytes(params)}

    return run.model, run.opt, held


def worker(models: list[str], micro_batch: int, seq: int, steps: int, show_progress: bool = False) -> list[dict]:
    """One rank: for each model and variant, the bytes held, peak RSS, collectives counted and step times."""
    import torch.distributed as dist

    rank, n = dist.get_rank(), dist.get_world_size()
    wrap(*P.reference().key, build("quick"))  # imports and first allocations, outside every variant's peak RSS
    out = []
    for name in models:
        for stage, impl in list(P.STRATEGIES):
            resettable = reset_peak_rss()
            rss0 = rss_bytes()
            model = build(name)
            psi = sum(p.numel() for p in model.parameters())
            vocab = model.config.vocab_size
            counter = CollectiveCounter(n)
            times = []
            with counter.counting():
                m, opt, held = wrap(stage, impl, model)
                for k in range(1 + steps):  # step 0 warms up (our FSDP learns its order, DDP its buckets)
                    counter.active = k > 0
                    # training's one optimizer step (experiments/step.py), unclipped: clipping's norm
                    # all-reduce is no part of a stage and would be counted with its collectives
                    timed = timed_step(m, opt, [batch_of(k, rank, vocab, micro_batch, seq)], max_grad_norm=0)
                    counter.active = False
                    if k > 0:
                        times.append(timed["end"] - timed["start"])
                # the step ends with zero_grad: one more backward, not counted, so the gradients are held
                # when `held()` counts them (the optimizer state exists since the first step)
                ids, labels = batch_of(1 + steps, rank, vocab, micro_batch, seq)
                m(input_ids=ids, labels=labels).loss.backward()
            out.append(
                {
                    "model": name,
                    "stage": stage,
                    "impl": impl,
                    "n": n,
                    "psi": psi,
                    "held": held(),
                    "rss_before": rss0,
                    "peak_rss": peak_rss_bytes(),
                    "peak_reset": resettable,
                    "calls": {op: c // steps for op, c in counter.calls.items()},
                    "coll_bytes": {op: b // steps for op, b in counter.bytes.items()},
                    "sent": counter.sent() / steps,
                    "step_s": times,
                }
            )
            if show_progress:
                print(f"{name} {stage}/{impl}: {out[-1]['held']}", flush=True)
            del m, opt, held, model
    return out


# ---- the table -------------------------------------------------------------------------------
def summarize(ranks: list[list[dict]]) -> list[dict]:
    """One row per (model, n, stage, impl): the largest rank's bytes (the one that runs out first), formulas."""
    rows, ref = [], P.reference().key
    for i, r in enumerate(ranks[0]):
        per_rank = [rk[i] for rk in ranks]
        held = {k: max(x["held"][k] for x in per_rank) for k in ("params", "grads", "optim")}
        strategy = P.lookup(r["stage"], r["impl"])
        want = strategy.predicted(r["psi"], r["n"])
        times = [max(x["step_s"][j] for x in per_rank) for j in range(len(r["step_s"]))]
        rows.append(
            {
                **{k: r[k] for k in ("model", "stage", "impl", "n", "psi", "calls", "coll_bytes")},
                "whose": strategy.impl.whose,
                "held": held,
                "predicted": want,
                "total": sum(held.values()),
                "predicted_total": sum(want.values()),
                "peak_rss_growth": max(x["peak_rss"] - x["rss_before"] for x in per_rank),
                "peak_rss": max(x["peak_rss"] for x in per_rank),
                "peak_reset": all(x["peak_reset"] for x in per_rank),
                "sent": max(x["sent"] for x in per_rank),
                "predicted_sent": strategy.predicted_sent(r["psi"], r["n"]),
                "step_ms": 1e3 * statistics.median(times),
            }
        )
    for r in rows:  # ratios to DDP (ours) of the same model and world size
        ddp = next(x for x in rows if (x["model"], x["n"], (x["stage"], x["impl"])) == (r["model"], r["n"], ref))
        r["total_vs_ddp"] = r["total"] / ddp["total"]
        r["sent_vs_ddp"] = r["sent"] / ddp["sent"]
        r["step_vs_ddp"] = r["step_ms"] / ddp["step_ms"]
    return rows


def _mb(b: float) -> str:
    return f"{b / 2**20:.1f}"


def table(rows: list[dict], oversubscribed: int) -> list[str]:
    md = [
        "Per rank, the largest rank's: MiB held after the step (measured / formula), peak RSS growth over the variant,",
        "MiB each rank sends per step (counted from the collectives called / formula), median step time of the",
        'slowest rank. Each "vs DDP" is against our DDP of the same model and ranks (docs/benchmarks.md §13\'s',
        "step-time table is against torch's).",
        "",
        "| model (Psi) | ranks | stage | whose | params | grads | optimizer | total | vs DDP | peak RSS +MiB "
        "| sent MiB/step | vs DDP | collectives per step | step ms | vs DDP |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    done, title = set(), {s.stage: s.title for s in P.STRATEGIES.values()}
    for r in rows:
        h, w = r["held"], r["predicted"]
        calls = ", ".join(f"{op} x{c}" for op, c in sorted(r["calls"].items()))
        slow = " (oversubscribed)" if r["n"] > oversubscribed else ""
        md.append(
            f"| {r['model']} ({r['psi'] / 1e6:.2f}M) | {r['n']} | {title[r['stage']]} | {r['whose']} "
            + " ".join(f"| {_mb(h[k])} / {_mb(w[k])}" for k in ("params", "grads", "optim"))
            + f" | {_mb(r['total'])} / {_mb(r['predicted_total'])} | {r['total_vs_ddp']:.2f} "
            f"| {_mb(r['peak_rss_growth'])} | {_mb(r['sent'])} / {_mb(r['predicted_sent'])} | {r['sent_vs_ddp']:.2f} "
            f"| {calls} | {r['step_ms']:.0f}{slow} | {r['step_vs_ddp']:.2f} |"
        )
        for (stage, impl), why in P.MISSING.items():  # once per model and world size, after the stage's rows
            key = (r["model"], r["n"], stage)
            if stage == r["stage"] and key not in done:
                done.add(key)
                whose = P.IMPLEMENTATIONS[impl].whose
                md.append(f"| {r['model']} | {r['n']} | {title[stage]} | {whose} | {why} |" + " |" * 10)
    return md


def run(
    out_dir: Path,
    quick: bool = False,
    models: str = "minilm-l6,distilbert",
    nprocs: str = "2,4",
    steps: int = 3,
    cluster: Cluster | None = None,
) -> dict:
    """Launch the ranks for each world size (one launch per model), then write memory.json and memory.md."""
    import os

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = dict(QUICK) if quick else dict(FULL, models=[m.strip() for m in models.split(",") if m.strip()], steps=steps)
    worlds = [2] if quick else [int(x) for x in str(nprocs).split(",")]
    rows = []
    for n in worlds:
        for name in cfg["models"]:
            ranks = launch_ranks("memory", n, {**cfg, "models": [name]}, quiet=quick, timeout_s=600, cluster=cluster)
            rows += summarize(ranks)
    where = "on this machine's loopback" if cluster is None else "over the emulated cluster's links"
    md = [
        f"AdamW fp32, every parameter trainable, micro-batch {cfg['micro_batch']} x {cfg['seq']} tokens per rank, "
        f"gloo {where}, {cfg['steps']} timed steps after one warm-up.",
        "",
        *table(rows, os.cpu_count() or 1),
    ]
    return write_result(out_dir, "memory", md, {"config": cfg, "rows": rows}, cluster=cluster, rows=rows)


def main(argv=None) -> None:
    def add(p):
        p.add_argument("--models", default="minilm-l6,distilbert", help="comma-separated: minilm-l6, distilbert")
        p.add_argument("--nprocs", default="2,4", help="world sizes")
        p.add_argument("--steps", type=int, default=3, help="timed steps per variant")

    part_main("memory", __doc__, run, argv, add)


if __name__ == "__main__":
    main()
