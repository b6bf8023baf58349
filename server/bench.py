"""How many requests a second the server answers, and how fast: batching on and off, 1 to 64 connections.

    python -m server.bench --checkpoint runs/compare/scratch/checkpoint --out runs/bench/server
    python -m server.bench --checkpoint CKPT --quick --out /tmp/sb        # seconds per point, a smoke run

For each setting (dynamic batching on, the default; and off: `--no-batching`, one forward pass per
request) the server runs in its own process on loopback, and `wrk` (Debian's C load generator:
`apt-get install wrk`) sends `POST /predict` with real AG News test articles (one per request,
rotating) over 1, 8 and 64 connections, `--duration` seconds each after a warm-up. Reported:
requests/s, p50 and p99 latency (wrk `--latency`), and the server's own batch sizes (its
/metrics). Beside them, measured in the same run:
- the load generator's ceiling: the same wrk against `GET /health` (no model), so the figures
  are known not to be wrk's limit;
- the model's own throughput: the same articles classified in-process in batches of 32 and of 1
  (texts/s), the ceiling that batching can approach.
Writes server.json, server.md and server.png to --out.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from experiments.launch import free_port

REPO = Path(__file__).resolve().parents[1]
AG_NEWS_TEST = REPO.parent / "shared" / "ag_news" / "test.csv"
CONNECTIONS = (1, 8, 64)
LUA = """
bodies = {}
for line in io.lines("%s") do bodies[#bodies + 1] = line end
counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  counter = counter + 1
  return wrk.format(nil, "/predict", nil, bodies[(counter %% #bodies) + 1])
end
"""


def articles(n: int) -> list[str]:
    """`n` real AG News test articles (title and description), or built-in examples without the CSVs."""
    import csv

    if AG_NEWS_TEST.exists():
        with open(AG_NEWS_TEST, newline="", encoding="utf-8") as f:
            return [f"{title} {desc}" for _, title, desc in (row for _, row in zip(range(n), csv.reader(f)))]
    from .pages import EXAMPLES

    return [EXAMPLES[i % len(EXAMPLES)] for i in range(n)]


def model_throughput(checkpoint: Path, texts: list[str], batch: int, max_length: int, seconds: float) -> float:
    """Texts per second of the model alone, in batches of `batch` (tokenizing included), in this process."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    done, i, t0 = 0, 0, time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - t0 < seconds:
            chunk = [texts[(i + k) % len(texts)] for k in range(batch)]
            model(**tok(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt"))
            done, i = done + batch, i + batch
    return done / (time.perf_counter() - t0)


def wrk(url: str, connections: int, seconds: float, script: Path | None = None) -> dict:
    """One wrk run: {"rps", "p50_ms", "p99_ms", "errors"} from its --latency report."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "10s"]
    out = subprocess.run(
        [*cmd, *(["-s", str(script)] if script else []), url], capture_output=True, text=True, timeout=seconds + 60
    ).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
        return float(m.group(1)) * scale[m.group(2)] if m else float("nan")

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = (int(errors.group(1)) if errors else 0) + (sum(map(int, socket_errors.groups())) if socket_errors else 0)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "p50_ms": ms("50"),
        "p99_ms": ms("99"),
        "errors": failed,
        "raw": out,
    }


def serve(checkpoint: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """Start `python -m server` on a free loopback port; return (process, url) once /ready says 200."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--checkpoint", str(checkpoint), "--port", str(port), *flags],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become ready in 120 s")


def batch_counters(url: str) -> tuple[float, float]:
    """(texts, forward passes) so far, from /metrics."""
    text = httpx.get(f"{url}/metrics").text
    total = re.search(r"^distrinews_batch_texts_sum ([\d.e+]+)$", text, re.M)
    count = re.search(r"^distrinews_batch_texts_count ([\d.e+]+)$", text, re.M)
    return (float(total.group(1)), float(count.group(1))) if total and count else (0.0, 0.0)


def run(checkpoint: Path, out: Path, seconds: float, quick: bool) -> dict:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: `apt-get install wrk` (Debian), `brew install wrk` (macOS)")
    out.mkdir(parents=True, exist_ok=True)
    texts = articles(64 if quick else 512)
    max_length = (
        json.loads((checkpoint / "training_args.json").read_text()).get("max_length", 128)
        if (checkpoint / "training_args.json").exists()
        else 128
    )
    alone = 2 if quick else 10  # seconds of in-process classification per batch size
    rows = {
        "model_batch32_texts_per_s": model_throughput(checkpoint, texts, 32, max_length, alone),
        "model_batch1_texts_per_s": model_throughput(checkpoint, texts, 1, max_length, alone),
    }
    with tempfile.TemporaryDirectory() as tmp:
        bodies = Path(tmp) / "bodies.txt"
        bodies.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        script = Path(tmp) / "predict.lua"
        script.write_text(LUA % bodies)
        for mode, flags in (("batching", ()), ("no batching", ("--no-batching",))):
            proc, url = serve(checkpoint, *flags)
            try:
                if mode == "batching":
                    rows["wrk_ceiling_health"] = wrk(f"{url}/health", 64, seconds)
                wrk(url, 8, 1 if quick else 3, script)  # warm-up
                for c in CONNECTIONS:
                    texts0, passes0 = batch_counters(url)
                    r = wrk(url, c, seconds, script)
                    texts1, passes1 = batch_counters(url)
                    r["mean_batch_texts"] = (texts1 - texts0) / max(passes1 - passes0, 1.0)  # during this point
                    rows[f"{mode}|{c}"] = r
            finally:
                proc.terminate()
                proc.wait(timeout=60)
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m server.bench", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("runs/bench/server"))
    p.add_argument("--duration", type=float, default=15.0, help="seconds per point")
    p.add_argument("--quick", action="store_true", help="2 s per point: checks that it runs")
    a = p.parse_args(argv)
    print(run(a.checkpoint, a.out, 2.0 if a.quick else a.duration, a.quick)["markdown"])


if __name__ == "__main__":
    main()
