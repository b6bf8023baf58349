"""The learner's aids stay true: generated pages are current, the diagram is drawn by code, the glossary complete.

- docs/onramp.md's "what you will see" blocks equal a fresh run of docs/examples/onramp_steps.py
  (2 real ranks, each on-ramp step's events in order, and its weights against torch's DDP's).
- docs/debugging.md's ring transcripts equal a fresh scripted pdb session of
  docs/examples/debugging_transcript.py (the plain ring, line numbers of today's collectives.py,
  no machine's absolute paths).
- docs/img/ddp_step.png is what docs/examples/ddp_step_diagram.py draws (same size in pixels;
  fonts may differ between machines, so not byte for byte) and docs/ddp-in-one-page.md shows it.
- docs/glossary.md defines every term a learner meets first (the list below).
The on-ramp check is also shown to fail on a page with one event changed.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
from support.paths import ROOT

EXAMPLES = ROOT / "docs" / "examples"
GLOSSARY_TERMS = [  # issue 30's list, and the words the on-ramp and exercises use
    "rank", "world size", "local rank", "process group", "backend", "bucket", "reducer", "all-reduce",
    "reduce-scatter", "all-gather", "micro-batch", "global batch", "no_sync", "snapshot", "shard",
    "overlap", "ring all-reduce", "comm hook", "Work", "torchrun", "gloo", "NCCL",
]  # fmt: skip


def _check(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=ROOT, capture_output=True, text=True, timeout=240
    )


def _load(script: str):
    """A docs/examples script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # 2 fresh processes importing torch: 37 s at load average 9
def test_onramp_page_is_current():
    r = _check("onramp_steps.py")  # the output a learner sees, all four steps
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    render = _load("onramp_steps.py").render
    page = (ROOT / "docs" / "onramp.md").read_text()
    assert render(page, r.stdout) == page, "docs/onramp.md is stale: python docs/examples/onramp_steps.py --write"
    assert r.stdout.count("weights after the step equal torch's DDP's, bit for bit: yes") == 4, r.stdout
    stale = page.replace("async: returns at once", "blocking", 1)  # the check can fail
    assert stale != page and render(stale, r.stdout) != stale


@pytest.mark.slow  # 5 fresh processes importing torch (2 and 3 ranks): 42 s at load average 9
def test_debugging_transcripts_are_current():
    r = _check("debugging_transcript.py", "--check")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    page = (ROOT / "docs" / "debugging.md").read_text()
    assert "_ring_grouped" in page.split("## How it works")[0], "the walk-through steps through the plain ring"
    assert not re.search(r"(^|[\s>(])/(work|home|root|Users)/", page, re.M), "no machine's absolute paths"


def test_diagram_is_drawn_by_its_script(tmp_path):
    from PIL import Image

    out = tmp_path / "ddp_step.png"
    r = _check("ddp_step_diagram.py", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    checked_in = ROOT / "docs" / "img" / "ddp_step.png"
    assert Image.open(out).size == Image.open(checked_in).size, "rerun docs/examples/ddp_step_diagram.py"
    assert "img/ddp_step.png" in (ROOT / "docs" / "ddp-in-one-page.md").read_text()


def test_glossary_defines_the_terms():
    rows = [line for line in (ROOT / "docs" / "glossary.md").read_text().splitlines() if line.startswith("| **")]
    defined = {t.strip().lower() for row in rows for t in re.match(r"\| \*\*(.+?)\*\*", row).group(1).split("/")}
    defined |= {re.sub(r"\s*\(.*\)", "", t) for t in defined}  # "fsdp (zero-3)" also defines "fsdp"
    missing = [t for t in GLOSSARY_TERMS if t.lower() not in defined]
    assert not missing, f"docs/glossary.md lacks {missing}"
    names = [re.match(r"\| \*\*(.+?)\*\*", row).group(1).lower() for row in rows]
    assert names == sorted(names), "the glossary is alphabetical"
