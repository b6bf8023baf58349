"""The checkpoint the server tests serve (a random tiny model whose answers tell texts apart), and
`Server`, `python -m server` in a subprocess.

At the tiny config's initial std (0.02) a random DistilBERT gives every text the same
probabilities to within 1e-5 (attention barely mixes the tokens into [CLS]), so a test that an
answer belongs to its own request could not fail. With every matrix drawn at std 0.4 the texts
of these tests get different labels and probabilities that differ by more than 0.01, while a
text's probabilities in a padded batch stay within 6e-6 of its own (measured).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from experiments.checkpoint import save_checkpoint
from experiments.launch import free_port
from experiments.model import LABELS, build_model, build_tokenizer
from support.paths import ROOT


def tiny_checkpoint(out: Path, max_length: int = 64) -> Path:
    """Save the seeded random tiny model (matrices at std 0.4) and its tokenizer to `out`."""
    torch.manual_seed(0)  # the weights are random: seed so every run serves the same model
    tok = build_tokenizer("tiny")
    model = build_model("tiny", vocab_size=len(tok))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # embeddings and linear layers; LayerNorms and biases as built
                p.normal_(0.0, 0.4)
    return save_checkpoint(model, tok, out, metadata={"model": "tiny", "max_length": max_length})


def assert_told_apart(answers: dict[str, dict], tolerance: float) -> None:
    """Every two texts' answers (`/predict` JSON) differ by over 100x `tolerance` in some class:
    a comparison at `tolerance` then catches an answer given to the wrong request."""
    items = list(answers.items())
    for i, (a, pa) in enumerate(items):
        for b, pb in items[i + 1 :]:
            gap = max(abs(pa["probabilities"][k] - pb["probabilities"][k]) for k in LABELS)
            assert gap > 100 * tolerance, (a, b, gap)


class Server:
    """`python -m server` in a subprocess on a free loopback port, ready when the context is entered."""

    def __init__(self, checkpoint: Path, tmp: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "server", "--checkpoint", str(checkpoint), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)

    def __enter__(self):
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
