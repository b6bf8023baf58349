"""Smoke test of experiments/bench/allreduce.py: the quick mode runs (2 real ranks over gloo) and
writes a consistent JSON, a Markdown table with every algorithm and a valid PNG. ~10 s on 2 cores."""

from __future__ import annotations

import json

from experiments.bench.allreduce import ALGORITHMS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # first 8 bytes of every PNG file (PNG spec, section 5.2)


def test_quick_run_writes_consistent_files(bench_quick):
    # run(quick=True) as the bench command's quick run called it, once per session (tests/conftest.py)
    tmp_path, out = bench_quick.out / "allreduce", bench_quick.results["allreduce"]

    files = out["files"]
    assert set(files) == {"json", "md", "png"}
    for path in files.values():
        assert path.exists() and path.parent == tmp_path and path.stat().st_size > 0

    # Markdown: the returned text is the file's, with a row per algorithm
    assert out["markdown"] + "\n" == files["md"].read_text()
    assert out["markdown"].startswith("Topology: 1 node, unshaped.")
    table = out["markdown"].split("Overlap check")[0]  # the algorithms' table comes first
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert {line.split("|")[1].strip() for line in rows} == set(ALGORITHMS)
    assert len(rows) == len(ALGORITHMS) * 2  # quick: 2 sizes x 1 world size

    # JSON: every run timed, positive times, nccl-tests definitions hold
    results = json.loads(files["json"].read_text())["results"]
    assert {r["algorithm"] for r in results} == set(ALGORITHMS)
    for r in results:
        n = r["world_size"]
        assert n == 2 and len(r["times_s"]) == r["runs"] == 3
        assert all(t > 0 for t in r["times_s"]) and r["median_ms"] > 0
        assert abs(r["algbw_GBps"] - r["bytes"] / (r["median_ms"] / 1e3) / 1e9) <= 1e-9 * r["algbw_GBps"]
        assert abs(r["busbw_GBps"] - r["algbw_GBps"] * 2 * (n - 1) / n) <= 1e-9 * r["busbw_GBps"]

    assert files["png"].read_bytes()[:8] == PNG_SIGNATURE

    # the overlap check (moved from the old benchmarks/ folder): both kinds of main-thread work
    assert [r["main_thread"] for r in out["overlap"]] == ["torch kernels", "pure Python"]
    for r in out["overlap"]:
        assert r["allreduce_alone_ms"] > 0 and r["allreduce_done_ms"] > 0 and r["main_thread_work_share"] > 0
    assert "| pure Python |" in out["markdown"]
