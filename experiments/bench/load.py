"""The load generator's pieces (experiments/bench/serving.py measures with them): wrk, a served server,
its batch counters, the articles sent, and the model's own rate in this process.

wrk is Debian's C load generator (`apt-get install wrk`): one thread, `--latency` percentiles. The
server is started as a user starts it, `python -m server`, so it is measured from outside.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from distrinews.errors import LaunchError, UsageError
from experiments.launch import free_port
from experiments.processes import stop_tree

REPO = Path(__file__).resolve().parents[2]
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


def require_wrk() -> None:
    """Raises UsageError, saying how to install it, unless wrk is on the PATH."""
    if shutil.which("wrk") is None:
        raise UsageError("wrk is not installed: `apt-get install wrk` (Debian), `brew install wrk` (macOS)")


@contextlib.contextmanager
def predict_script(texts: list[str]) -> Iterator[Path]:
    """A wrk Lua script (yielded, in a temporary folder) that POSTs `texts` to /predict, one per request, in turn."""
    with tempfile.TemporaryDirectory() as tmp:
        bodies = Path(tmp) / "bodies.txt"
        bodies.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        script = Path(tmp) / "predict.lua"
        script.write_text(LUA % bodies)
        yield script


def articles(n: int, data_dir: Path | None = None) -> list[str]:
    """`n` real AG News test articles from `data_dir` (read by training's own loader, experiments/data.py:
    title and description, cleaned as training cleans them), or the page's built-in examples without it.
    Raises DataError (a UsageError) if `data_dir` does not hold AG News' CSVs."""
    if data_dir is not None:
        from experiments.data import load_ag_news

        return list(load_ag_news(str(data_dir), max_eval_samples=n)["test"]["text"])
    from server.pages import EXAMPLES

    return [EXAMPLES[i % len(EXAMPLES)] for i in range(n)]


def model_throughput(
    checkpoint: Path, texts: list[str], batch: int, max_length: int, seconds: float, backend: str = "torch"
) -> float:
    """Texts per second of the model alone, in batches of `batch` (tokenizing included), in this process,
    through the server's own tokenizer and `backend`'s predictor (the int8 model for onnx)."""
    from server.checkpoint import Checkpoint
    from server.config import ServerConfig
    from server.predictor import BACKENDS
    from server.tokenizer import TextTokenizer

    ckpt, tok = Checkpoint.open(checkpoint), TextTokenizer(checkpoint, max_length)
    predictor = BACKENDS[backend].loader(ServerConfig().onnx_model, None)(ckpt, tok.pad_id)
    predictor(tok(texts[:batch]))  # warm-up: the first pass allocates
    done, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        predictor(tok([texts[(i + k) % len(texts)] for k in range(batch)]))
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


@contextlib.contextmanager
def served(checkpoint: Path, *flags: str) -> Iterator[str]:
    """`python -m server --checkpoint CHECKPOINT FLAGS` on a free loopback port: yields its URL once /ready
    says 200, and stops it (SIGTERM: a graceful shutdown) on leaving. Raises LaunchError if it is not
    ready within 120 s."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--checkpoint", str(checkpoint), "--port", str(port), *flags],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"python -m server --checkpoint {checkpoint} was not ready in 120 s: run it alone to see why"
                )
            time.sleep(0.2)
        yield url
    finally:
        stop_tree(proc, grace_s=60)  # SIGTERM, time for a graceful shutdown, then SIGKILL


def batch_counters(url: str) -> tuple[float, float]:
    """(texts, forward passes) so far, from /metrics."""
    text = httpx.get(f"{url}/metrics").text
    total = re.search(r"^distrinews_batch_texts_sum ([\d.e+]+)$", text, re.M)
    count = re.search(r"^distrinews_batch_texts_count ([\d.e+]+)$", text, re.M)
    return (float(total.group(1)), float(count.group(1))) if total and count else (0.0, 0.0)


def in_child(fn, *args):
    """fn(*args) in a forked child process (so that one backend's threads and memory do not stay in
    this process for the next), its return value sent back through a pipe."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=lambda: child.send(fn(*args)))
    p.start()
    value = parent.recv()
    p.join()
    return value
