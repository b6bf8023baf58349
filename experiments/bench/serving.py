"""How many requests a second the server answers, and how fast: batching on and off, 1 to 64 connections.

    python -m experiments.bench.serving --checkpoint CKPT --data-dir DIR --out runs/bench/server
    python -m experiments.bench.serving --checkpoint CKPT --quick --out /tmp/sb    # 2 s per point, a smoke run

The load generator of server/ (the service of record), kept out of it: the server's image holds
what serves, nothing that measures it. It starts `python -m server` as a user would, so it
measures the server from outside, the way a client sees it.

For each setting (dynamic batching on, the default; and off: `--no-batching`, one forward pass per
request) the server runs in its own process on loopback, and `wrk` (Debian's C load generator:
`apt-get install wrk`) sends `POST /predict` with real AG News test articles (one per request,
rotating) over 1, 8 and 64 connections, `--duration` seconds each after a warm-up. Reported:
requests/s, p50 and p99 latency (wrk `--latency`), and the server's own batch sizes (its
/metrics). The articles come from DIR/test.csv (`--data-dir`, AG News' CSVs), else from the
page's built-in examples. Beside them, measured in the same run:
- the load generator's ceiling: the same wrk against `GET /health` (no model), so the figures
  are known not to be wrk's limit;
- the model's own throughput: the same articles classified in-process in batches of 32 and of 1
  (texts/s), the ceiling that batching can approach.
Writes server.json, server.md and server.png to --out.

    python -m experiments.bench.serving --checkpoint CKPT --data-dir DIR --backends torch,onnx --rounds 3 \
        --out runs/bench/backends

compares the backends instead (`--backend`, server/predictor.py; CKPT exported by
`python -m experiments.export`): for each round, each backend in turn, the model's own batch rate
(batches of 32, in this process, through the server's own tokenizer and predictor) and the server
under 64 connections (batching on, the same wrk and articles); the ratios onnx/torch are taken
within a round, so that a change of load on a shared machine between rounds cancels out.
Writes backends.json and backends.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import httpx

from distrinews.errors import guard
from server.checkpoint import Checkpoint

from .load import articles, batch_counters, in_child, model_throughput, predict_script, require_wrk, served, wrk

CONNECTIONS = (1, 8, 64)


def run(checkpoint: Path, out: Path, seconds: float, quick: bool, data_dir: Path | None = None) -> dict:
    """Batching on and off at 1, 8 and 64 connections, `seconds` per point; writes server.json, .md and
    .png to `out` and returns {"markdown", "rows"}. Raises UsageError without wrk."""
    require_wrk()
    out.mkdir(parents=True, exist_ok=True)
    texts = articles(64 if quick else 512, data_dir)
    max_length = Checkpoint.open(checkpoint).max_length()
    alone = 2 if quick else 10  # seconds of in-process classification per batch size
    rows = {
        "model_batch32_texts_per_s": model_throughput(checkpoint, texts, 32, max_length, alone),
        "model_batch1_texts_per_s": model_throughput(checkpoint, texts, 1, max_length, alone),
    }
    with predict_script(texts) as script:
        for mode, flags in (("batching", ()), ("no batching", ("--no-batching",))):
            with served(checkpoint, *flags) as url:
                if mode == "batching":
                    rows["wrk_ceiling_health"] = wrk(f"{url}/health", 64, seconds)
                wrk(url, 8, 1 if quick else 3, script)  # warm-up
                for c in CONNECTIONS:
                    texts0, passes0 = batch_counters(url)
                    r = wrk(url, c, seconds, script)
                    texts1, passes1 = batch_counters(url)
                    r["mean_batch_texts"] = (texts1 - texts0) / max(passes1 - passes0, 1.0)  # during this point
                    rows[f"{mode}|{c}"] = r
    import torch

    md = [
        f"`POST /predict`, one AG News test article per request (max_length {max_length}), wrk -t1, "
        f"{seconds:g} s per point, loopback, {torch.get_num_threads()} torch threads.",
        "",
        "| batching | connections | requests/s | p50 ms | p99 ms | mean texts per forward pass | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in ("batching", "no batching"):
        for c in CONNECTIONS:
            r = rows[f"{mode}|{c}"]
            md.append(
                f"| {'on' if mode == 'batching' else 'off'} | {c} | {r['rps']:.1f} | {r['p50_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {r['mean_batch_texts']:.1f} | {r['errors']} |"
            )
    ceiling = rows["wrk_ceiling_health"]
    md += [
        "",
        f"Model alone, same articles: {rows['model_batch32_texts_per_s']:.0f} texts/s in batches of 32, "
        f"{rows['model_batch1_texts_per_s']:.0f} texts/s one at a time. Load generator's ceiling (wrk, 64 "
        f"connections, GET /health): {ceiling['rps']:.0f} requests/s.",
    ]
    md = "\n".join(md)
    for r in rows.values():
        if isinstance(r, dict):
            r.pop("raw", None)
    (out / "server.md").write_text(md + "\n")
    (out / "server.json").write_text(json.dumps(rows, indent=2))
    _plot(rows, out / "server.png")
    return {"markdown": md, "rows": rows}


def compare_backends(
    checkpoint: Path,
    out: Path,
    backends: list[str],
    seconds: float,
    rounds: int,
    connections: int = 64,
    data_dir: Path | None = None,
) -> dict:
    """Each round: for each backend in turn, its model batch rate (32 texts a pass) and its server's
    requests/s and p99 at `connections` (batching on). Returns and writes backends.json and .md.
    Raises UsageError without wrk."""
    require_wrk()
    out.mkdir(parents=True, exist_ok=True)
    texts, max_length = articles(512, data_dir), Checkpoint.open(checkpoint).max_length()
    runs: list[dict] = []
    with predict_script(texts) as script:
        for k in range(rounds):
            for backend in backends:
                row = {"round": k, "backend": backend, "load_before": os.getloadavg()[0]}
                row["model_batch32_texts_per_s"] = in_child(
                    model_throughput, checkpoint, texts, 32, max_length, seconds, backend
                )
                with served(checkpoint, "--backend", backend) as url:
                    # what the server says it runs (/info): the row measures that model, not the flag's promise
                    b = httpx.get(f"{url}/info").json()["backend"]
                    row["served"] = " ".join(x for x in (b["name"], b["model"]) if x)
                    wrk(url, 8, 3, script)  # warm-up
                    r = wrk(url, connections, seconds, script)
                row.update({key: r[key] for key in ("rps", "p50_ms", "p99_ms", "errors")})
                row["load_after"] = os.getloadavg()[0]
                runs.append(row)
                print(json.dumps(row), flush=True)
    ratios = _ratios(runs, backends[0], backends[-1], rounds)
    md = _backends_markdown(runs, ratios, backends[0], backends[-1], max_length, connections, seconds, rounds)
    result = {"runs": runs, "ratios": ratios, "markdown": md}
    (out / "backends.json").write_text(json.dumps(result, indent=2))
    (out / "backends.md").write_text(md + "\n")
    return result


def _ratios(runs: list[dict], base: str, other: str, rounds: int) -> list[dict]:
    """Per round, `other` over `base`: model texts/s, server requests/s, p99 (a pair measured back to back)."""
    by = {(r["round"], r["backend"]): r for r in runs}
    return [
        {
            "round": k,
            "model": by[k, other]["model_batch32_texts_per_s"] / by[k, base]["model_batch32_texts_per_s"],
            "server_rps": by[k, other]["rps"] / by[k, base]["rps"],
            "p99": by[k, other]["p99_ms"] / by[k, base]["p99_ms"],
        }
        for k in range(rounds)
    ]


def _backends_markdown(
    runs: list[dict],
    ratios: list[dict],
    base: str,
    other: str,
    max_length: int,
    connections: int,
    seconds: float,
    rounds: int,
) -> str:
    """backends.md: how it was measured, every run, then the per-round ratios."""
    md = [
        f"`POST /predict`, one AG News test article per request (max_length {max_length}), wrk -t1 -c{connections}, "
        f"{seconds:g} s per point after a 3 s warm-up, loopback; model alone: batches of 32 texts, {seconds:g} s, "
        f"tokenizing included. {rounds} rounds, the backends in turn within each.",
        "",
        "| round | backend (served model) | model texts/s (batch 32) | server requests/s | p50 ms | p99 ms | errors "
        "| load average (1 min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        md.append(
            f"| {r['round']} | {r['backend']} ({r['served']}) | {r['model_batch32_texts_per_s']:.1f} | "
            f"{r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | "
            f"{r['load_before']:.1f} -> {r['load_after']:.1f} |"
        )
    md += ["", f"| round | {other}/{base}: model texts/s | server requests/s | p99 |", "|---|---|---|---|"]
    md += [f"| {q['round']} | {q['model']:.2f} | {q['server_rps']:.2f} | {q['p99']:.2f} |" for q in ratios]
    return "\n".join(md)


def _plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, color in (("batching", "tab:blue"), ("no batching", "tab:orange")):
        a.plot(CONNECTIONS, [rows[f"{mode}|{c}"]["rps"] for c in CONNECTIONS], "o-", color=color, label=mode)
        b.plot(CONNECTIONS, [rows[f"{mode}|{c}"]["p99_ms"] for c in CONNECTIONS], "o-", color=color, label=mode)
    a.axhline(rows["model_batch32_texts_per_s"], color="grey", ls="--", label="model alone, batches of 32")
    a.axhline(rows["model_batch1_texts_per_s"], color="grey", ls=":", label="model alone, one at a time")
    for ax, label in ((a, "requests/s"), (b, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(CONNECTIONS, [str(c) for c in CONNECTIONS])
        ax.set_xlabel("concurrent connections (wrk)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bench.serving", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=None, help="AG News CSVs (test.csv): the articles sent")
    p.add_argument("--out", type=Path, default=Path("runs/bench/server"))
    p.add_argument("--duration", type=float, default=15.0, help="seconds per point")
    p.add_argument("--quick", action="store_true", help="2 s per point: checks that it runs")
    p.add_argument("--backends", default=None, help="compare backends instead, e.g. torch,onnx (ratios: last/first)")
    p.add_argument("--rounds", type=int, default=3, help="with --backends: rounds, the backends in turn in each")
    a = p.parse_args(argv)
    seconds = 2.0 if a.quick else a.duration

    def body() -> None:
        if a.backends:
            result = compare_backends(
                a.checkpoint, a.out, a.backends.split(","), seconds, a.rounds, data_dir=a.data_dir
            )
        else:
            result = run(a.checkpoint, a.out, seconds, a.quick, a.data_dir)
        print(result["markdown"])

    return guard(body)


if __name__ == "__main__":
    sys.exit(main())
