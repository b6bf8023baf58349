"""Every bench part's quick run (`python -m experiments.bench --quick --only <part>`), each checked by its own
`check_<part>(result, out)`: `result` is what the part's `run(quick=True)` returned (read back from the
run's summary.json and README.md, support/bench.py), `out` the folder it wrote.

Each part runs in its own forked command (the bench command stops at its first failing part: one
command per part keeps a failure in its own test); the torchrun agents and ranks it launches are
forked too. allreduce and sparse are read from the dispatcher's run (the `bench_quick` fixture, which
tests/bench/test_bench_cli.py reads). The link part needs the emulated cluster (root, namespaces):
tests/bench/test_bench_link.py.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from support import bench
from support.paths import AG_NEWS, needs_ag_news

from experiments import parallel
from experiments.bench import allreduce, buckets, scaling, sparse, step, timeline
from experiments.bench.__main__ import PARTS
from experiments.bench.common.wrappers import IMPLS as STEP_IMPLS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # first 8 bytes of every PNG file (PNG spec, section 5.2)


def tiny_model_params() -> int:
    """Parameter tensors of the tiny model that get a gradient."""
    from experiments.model import build_model, build_tokenizer

    return sum(p.requires_grad for p in build_model("tiny", vocab_size=len(build_tokenizer("tiny"))).parameters())


def check_step(result: dict, out: Path) -> None:
    """Real ranks, all four DDPs interleaved, counts that explain buckets."""
    rows = result["rows"]
    assert set(rows) == set(STEP_IMPLS)
    for impl, r in rows.items():
        assert r["median_ms"] > 0 and len(r["step_ms"]) == step.QUICK["steps"], impl
    assert rows["native"]["ratio_to_native"] == 1.0
    n_params = tiny_model_params()
    # naive.py: one all-reduce per parameter; the tiny model's gradients fit the buckets of the others
    assert rows["scratch-naive"]["allreduces_per_step"] == n_params
    assert rows["native"]["allreduces_per_step"] < n_params
    # ours: the same buckets as native, plus the one "got a gradient" count all-reduce
    assert (
        rows["scratch-torch"]["allreduces_per_step"]
        == rows["scratch-ring"]["allreduces_per_step"]
        == rows["native"]["allreduces_per_step"] + 1
    )
    saved = json.loads((out / "step.json").read_text())
    assert set(saved["rows"]) == set(STEP_IMPLS)
    assert all(f"| {impl} |" in (out / "step.md").read_text() for impl in STEP_IMPLS)


def check_timeline(result: dict, out: Path) -> None:
    """Real ranks, both DDPs, files a learner can open: events, Chrome trace, PNG, table."""
    saved = json.loads((out / "timeline.json").read_text())
    assert saved["topology"]["description"] == "1 node, unshaped"
    events = saved["events"]
    for impl in timeline.IMPLS:
        for rank in (0, 1):
            mine = [e for e in events if e["impl"] == impl and e["rank"] == rank]
            kinds = {e["kind"] for e in mine}
            assert {"forward", "backward", "optimizer", "allreduce"} <= kinds, (impl, rank, kinds)
            assert all(e["end"] >= e["start"] for e in mine)
        assert 0.0 <= result["stats"][impl]["overlap"] <= 1.0
    trace = json.loads((out / "trace.json").read_text())
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert any(e["name"].startswith("bucket") and e["tid"] == 1 for e in slices)
    assert all(isinstance(e["pid"], int) and isinstance(e["tid"], int) and e["dur"] >= 0 for e in slices)
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert {"compute", "all-reduce", "native rank 0", "scratch-ring rank 1"} <= names
    assert (out / "timeline.png").read_bytes()[:8] == PNG_SIGNATURE
    md = (out / "timeline.md").read_text()
    assert all(f"| {impl} |" in md for impl in timeline.IMPLS), md


def check_allreduce(result: dict, out: Path) -> None:
    """2 real ranks over gloo: a consistent JSON, a Markdown table with every algorithm, a valid PNG."""
    files = {kind: Path(path) for kind, path in result["files"].items()}
    assert set(files) == {"json", "md", "png"}
    for path in files.values():
        assert path.exists() and path.parent == out and path.stat().st_size > 0

    # Markdown: the returned text is the file's, with a row per algorithm
    assert result["markdown"] + "\n" == files["md"].read_text()
    assert result["markdown"].startswith("Topology: 1 node, unshaped.")
    table = result["markdown"].split("Overlap check")[0]  # the algorithms' table comes first
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert {line.split("|")[1].strip() for line in rows} == set(allreduce.ALGORITHMS)
    assert len(rows) == len(allreduce.ALGORITHMS) * 2  # quick: 2 sizes x 1 world size

    # JSON: every run timed, positive times, nccl-tests definitions hold
    results = json.loads(files["json"].read_text())["results"]
    assert {r["algorithm"] for r in results} == set(allreduce.ALGORITHMS)
    for r in results:
        n = r["world_size"]
        assert n == 2 and len(r["times_s"]) == r["runs"] == 3
        assert all(t > 0 for t in r["times_s"]) and r["median_ms"] > 0
        assert abs(r["algbw_GBps"] - r["bytes"] / (r["median_ms"] / 1e3) / 1e9) <= 1e-9 * r["algbw_GBps"]
        assert abs(r["busbw_GBps"] - r["algbw_GBps"] * 2 * (n - 1) / n) <= 1e-9 * r["busbw_GBps"]

    assert files["png"].read_bytes()[:8] == PNG_SIGNATURE

    # the overlap check (moved from the old benchmarks/ folder): both kinds of main-thread work
    assert [r["main_thread"] for r in result["overlap"]] == ["torch kernels", "pure Python"]
    for r in result["overlap"]:
        assert r["allreduce_alone_ms"] > 0 and r["allreduce_done_ms"] > 0 and r["main_thread_work_share"] > 0
    assert "| pure Python |" in result["markdown"]


def check_ring(result: dict, out: Path) -> None:
    """Our ring all-reduce against gloo's, its halves, its settings, the machine's limits."""
    from experiments.bench.ring import SETTINGS

    (table,) = result["tables"].values()
    ms = table["ms"]
    assert len([k for k in ms if k.startswith("ring all-reduce")]) == len(SETTINGS)
    assert {"gloo all-reduce", "gloo all-gather", "ring all-gather", "copy_ of S"} <= set(ms)
    assert all(v > 0 for v in ms.values())
    # 2 ranks: the ideal ring is 2 steps of the one-message transport; a message costs something
    assert table["ideal_ring_ms"] == 2 * ms["one ring step, one message"] and table["per_message_ms"] > 0
    assert json.loads((out / "ring.json").read_text())["tables"]["2"]["ms"] == ms
    assert "| gloo all-reduce |" in (out / "ring.md").read_text()


def check_sparse(result: dict, out: Path) -> None:
    """The sparse exchange against the dense all-reduce, with both collectives."""
    quick = sparse.QUICK
    rows = result["rows"]
    assert {(r["algorithm"], r["fraction"]) for r in rows} == {
        (a, int(f * quick["vocab"]) / quick["vocab"]) for a in ("torch", "ring") for f in quick["fractions"]
    }
    for r in rows:
        assert r["sparse_ms"] > 0 and r["dense_ms"] > 0
        # 2 ranks: the all-gather sends k rows of D fp32 + an int64 index; the ring all-reduce V x D fp32
        assert r["byte_share"] == pytest.approx(r["k"] * (quick["dim"] * 4 + 8) / (quick["vocab"] * quick["dim"] * 4))
    assert set(result["break_even"]) == {"torch, 2 ranks", "ring, 2 ranks"}
    assert json.loads((out / "sparse.json").read_text())["rows"] == rows


def check_buckets(result: dict, out: Path) -> None:
    """Three DDPs, two extreme caps: the bucket counts, overlap and files."""
    label, per_param_cap, one_bucket_cap = buckets.cap_label, buckets.PER_PARAM, buckets.ONE_BUCKET
    assert set(buckets.QUICK_CAPS) == {per_param_cap, one_bucket_cap}
    n_params = result["n_params"]
    assert n_params > 10  # the tiny model has ~40 parameter tensors
    for impl in buckets.IMPLS:
        per_param = result["results"][f"{impl}|{label(per_param_cap)}"]
        one = result["results"][f"{impl}|{label(one_bucket_cap)}"]
        # every rank, every measured step: one all-reduce per parameter, resp. exactly one
        assert per_param["buckets"] == [n_params], (impl, per_param["buckets"])
        assert one["buckets"] == [1], (impl, one["buckets"])
        for r in (per_param, one):
            assert 0.0 <= r["overlap"] <= 1.0
            assert r["median_ms"] > 0 and r["allreduce_ms_per_step"] > 0
            assert len(r["step_ms"]) == result["config"]["steps"]
        assert result["results"][f"native|{label(per_param_cap)}"]["ratio_to_native"] == 1.0
    saved = json.loads((out / "buckets.json").read_text())
    assert saved["n_params"] == n_params and set(saved["results"]) == set(result["results"])
    assert (out / "buckets.png").read_bytes()[:8] == PNG_SIGNATURE
    table = (out / "buckets.md").read_text()
    for cap in buckets.QUICK_CAPS:
        for impl in buckets.IMPLS:
            assert f"| {label(cap)} | {impl} |" in table
    assert f"| {label(per_param_cap)} | native | {n_params} |" in table


def check_scaling(result: dict, out: Path) -> None:
    """1 and 2 real processes, both DDPs, same global batch: derived figures consistent."""
    rows, worlds, quick = result["rows"], scaling.QUICK["world_sizes"], scaling.QUICK
    assert result["global_batch"] == quick["micro_batch"] * max(worlds)
    for impl in scaling.IMPLS:
        base = rows[f"{impl}|1"]
        assert base["speedup"] == 1.0 and base["compute_slowdown"] == 1.0
        for n in worlds:
            r = rows[f"{impl}|{n}"]
            assert r["samples_per_s"] > 0 and r["step_ms_sync"] > 0 and r["step_ms_nosync"] > 0
            assert math.isclose(r["speedup"], r["samples_per_s"] / base["samples_per_s"])
            assert math.isclose(r["efficiency"], r["speedup"] / n)
            # same global batch: each rank accumulates G / (N x micro-batch) micro-batches
            assert r["micro_batches_per_rank"] * n * quick["micro_batch"] == result["global_batch"]
    assert rows["native|2"]["threads_per_process"] == max(1, (os.cpu_count() or 1) // 2)
    saved = json.loads((out / "scaling.json").read_text())
    assert set(saved["rows"]) == set(rows)
    assert (out / "scaling.png").read_bytes()[:8] == PNG_SIGNATURE
    table = (out / "scaling.md").read_text()
    for impl in scaling.IMPLS:
        for n in worlds:
            assert f"| {impl} | {n} |" in table


def check_snapshot(result: dict, out: Path) -> None:
    """A real 2-rank run with snapshots: their size, time and share of the training."""
    (row,) = result["rows"]
    assert row["model"] == "tiny" and row["snapshots"] == row["mid_epoch_snapshots"] + 1  # + the epoch end
    assert row["bytes"] > 3 * 39_236 * 4  # weights and AdamW's two moments, fp32
    assert all(s > 0 for s in row["seconds"]) and 0 < row["share_of_training"] < 1
    assert json.loads((out / "snapshot.json").read_text())["rows"][0]["bytes"] == row["bytes"]
    assert "| tiny |" in (out / "snapshot.md").read_text()


def check_grouping(result: dict, out: Path) -> None:
    """Two real 2-rank runs, random and length-grouped batches: padding, time and accuracy."""
    random, grouped = result["rows"]
    assert (random["grouped"], grouped["grouped"]) == (False, True)
    assert random["steps"] == grouped["steps"] == 2  # 64 rows / global batch 32
    # the tiny tokenizer makes 90-310 tokens of these rows: grouped batches pad much less
    assert 1.0 <= grouped["padding"] < random["padding"]
    assert random["time_ratio"] == 1.0 and grouped["time_ratio"] > 0
    assert random["test_n"] == grouped["test_n"] == 40  # every test example counted once, sorted or not
    assert json.loads((out / "grouping.json").read_text())["rows"][1]["grouped"] is True
    assert "| 256 | grouped |" in (out / "grouping.md").read_text()


def check_accuracy(result: dict, out: Path) -> None:
    """Both DDPs on real AG News rows, one loss plot, one confusion matrix. Run alone (ACCURACY_ARGS), so
    `result` is what accuracy.json holds: the part's return value adds only `test_accuracy`, the best run's."""
    acc = result
    native, scratch = (json.loads((out / k / "summary.json").read_text()) for k in ("native", "scratch"))
    assert acc["best"] in ("native", "scratch") and acc["runs"][acc["best"]]["test_accuracy"] == max(
        native["test_accuracy"], scratch["test_accuracy"]
    )
    assert native["steps"] == scratch["steps"] == 3  # the override won: 48 rows / global batch 16
    assert acc["max_weight_diff_native_vs_scratch"] <= 1e-6  # same seed and data order: the same model
    # the confusion matrix counts every capped test row once
    assert sum(map(sum, acc["runs"][acc["best"]]["test"]["confusion"])) == acc["runs"][acc["best"]]["test"]["n"]
    for name in ("loss_curves.png", "confusion.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "| scratch |" in (out / "accuracy.md").read_text()


def check_memory(result: dict, out: Path) -> None:
    """Real ranks hold what the ZeRO paper's formula says, and send what their collectives say."""
    rows = result["rows"]
    assert {(r["stage"], r["whose"]) for r in rows} == {
        ("ddp", "ours"), ("ddp", "torch"), ("zero1", "ours"), ("zero1", "torch"),
        ("zero2", "ours"), ("fsdp", "ours"), ("fsdp", "torch"),
    }  # fmt: skip
    by = {(r["stage"], r["whose"]): r for r in rows}
    for r in rows:
        n, psi = r["n"], r["psi"]
        assert n == 2 and r["predicted"] == parallel.lookup(r["stage"], r["impl"]).predicted(psi, n)
        for kind, want in r["predicted"].items():  # parameters, gradients, optimizer state: each within 10%
            assert abs(r["held"][kind] - want) <= 0.1 * want, (r["stage"], r["whose"], kind, r["held"][kind], want)
        factor = r["predicted_total"] / (16 * psi)  # below DDP by the predicted factor (1, 3/4, 5/8, 1/2 at 2 ranks)
        assert abs(r["total_vs_ddp"] - factor) <= 0.1 * factor, (r["stage"], r["whose"], r["total_vs_ddp"], factor)
        assert r["peak_rss"] > 0 and r["step_ms"] > 0
    # bytes sent, counted from the collectives called: DDP 2 units, ZeRO-1 3, ZeRO-2 2, FSDP 3 (x (n-1)/n 4 Psi)
    for key in [("ddp", "ours"), ("ddp", "torch"), ("zero1", "ours"), ("zero1", "torch"), ("zero2", "ours")]:
        r = by[key]
        assert abs(r["sent"] - r["predicted_sent"]) <= 0.1 * r["predicted_sent"], (key, r["sent"], r["predicted_sent"])
    assert by["fsdp", "ours"]["sent_vs_ddp"] == pytest.approx(1.5, rel=0.05)  # gathers twice, reduce-scatters once
    assert 1.3 <= by["fsdp", "torch"]["sent_vs_ddp"] <= 1.5  # torch keeps its root gathered for backward
    assert by["fsdp", "ours"]["calls"] == {"all_gather_single": 6, "reduce_scatter_tensor": 3}  # 3 units
    assert by["zero2", "ours"]["calls"].get("all_reduce", 0) == 0  # no all-reduce of gradients at all
    assert json.loads((out / "memory.json").read_text())["rows"] == rows


CHECKS = {
    "step": check_step,
    "timeline": check_timeline,
    "allreduce": check_allreduce,
    "ring": check_ring,
    "sparse": check_sparse,
    "buckets": check_buckets,
    "scaling": check_scaling,
    "snapshot": check_snapshot,
    "grouping": check_grouping,
    "accuracy": check_accuracy,
    "memory": check_memory,
}
SLOW = {"scaling", "snapshot", "grouping", "accuracy", "memory"}  # 25-50 s each on 2 cores
NEEDS_DATA = {"snapshot", "grouping", "accuracy"}  # real AG News rows
ON_THE_CLUSTER = {"link": "test_bench_link.py"}  # needs root and network namespaces: its own file
# accuracy runs alone (`python -m experiments.bench.accuracy`): only there do extra flags reach training
ACCURACY_ARGS = ["--data-dir", str(AG_NEWS), "--max-train-samples", "48"]


def _param(part: str):
    marks = [pytest.mark.slow] * (part in SLOW) + [needs_ag_news] * (part in NEEDS_DATA)
    return pytest.param(part, marks=marks, id=part)


@pytest.mark.parametrize("part", [_param(p) for p in PARTS if p in CHECKS])
def test_quick_part(part, request, tmp_path):
    if part == "accuracy":
        run = bench.alone(part, tmp_path / part, ACCURACY_ARGS)
        run.ok()
        CHECKS[part](json.loads((run.out / "accuracy.json").read_text()), run.out)
        return
    run = request.getfixturevalue("bench_quick") if part in bench.CLI_PARTS else None
    if run is None or run.exit_code != 0:  # the dispatcher's run failed: this part alone, so the failure is its own
        run = bench.quick((part,), tmp_path)
    CHECKS[part](run.result(part), run.out / part)


def test_every_part_has_its_quick_check():
    assert set(PARTS) == set(CHECKS) | set(ON_THE_CLUSTER), (PARTS, sorted(CHECKS))
    assert all((Path(__file__).parent / f).exists() for f in ON_THE_CLUSTER.values())


def test_bucket_cap_and_frozen_embeddings_reach_every_implementation(tmp_path):
    """A 1-byte cap closes a bucket after every parameter, in all three (the ring included);
    frozen word embeddings are in no bucket. The timeline part alone, with its own options."""
    n_params = tiny_model_params()
    bench.alone("timeline", tmp_path, ["--bucket-cap-mb", "1e-6", "--freeze-embeddings"]).ok()
    saved = json.loads((tmp_path / "timeline.json").read_text())
    events = saved["events"]
    for impl in timeline.IMPLS:
        per_step = {}
        for e in events:
            if e["impl"] == impl and e["kind"] == "allreduce":
                per_step[(e["rank"], e["step"])] = per_step.get((e["rank"], e["step"]), 0) + 1
        assert set(per_step.values()) == {n_params - 1}, (impl, per_step, n_params)
        # every step names the buckets 0 .. n-1 (the trace labels them so)
        first = sorted(
            e["bucket"]
            for e in events
            if e["impl"] == impl and e["kind"] == "allreduce" and e["rank"] == 0 and e["step"] == 1
        )
        assert first == list(range(n_params - 1)), (impl, first)
    assert saved["config"]["bucket_cap_mb"] == 1e-6
    md = (tmp_path / "timeline.md").read_text()
    assert "bucket cap 1e-06 MiB" in md and "word embeddings frozen" in md
