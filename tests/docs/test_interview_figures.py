"""docs/interview.md's figures cannot go stale: each is found in the result it quotes.

A figure is a number with a unit (ms, %, GB/s, MiB, MB, x) or a ratio written as "1.003"; a
range "77-80%" is two figures. Each paragraph (or list item) that quotes one must link the
benchmarks.md section (or README.md) it comes from, and every figure must appear, as a number,
in the text of the linked sections. The back-of-envelope section at the end (vendor
bandwidths, cited, labelled "not measured here") is arithmetic, not a result, and is skipped;
so are paragraphs whose source is a test they name (`tests/<subject>/test_*.py`: the figure is what that
test measures and bounds, e.g. tests/sharded/test_zero_memory.py), fenced code blocks and figures in
double quotes (claims we quote, such as a tutorial's "1.8x").
"""

from __future__ import annotations

import re
from pathlib import Path

from support.markdown import anchors, prose, slug
from support.paths import ROOT

FIGURE = re.compile(r"(?<![\w.§/])(\d[\d,]*(?:\.\d+)?)(?:\s?-\s?(\d[\d,]*(?:\.\d+)?))?\s?(ms|%|GB/s|MiB|MB|x)(?!\w)")
LINK = re.compile(r"\]\(((?:benchmarks\.md|\.\./README\.md))(?:#([^)\s]*))?\)")
# numbers that are settings or definitions, not results: caps, sizes, micro-batches
SETTINGS = {"1 MiB", "25 MiB", "4 MiB", "1 KB", "16 x", "2 x"}


def sections(path: Path) -> dict[str, str]:
    """GitHub slug of each '## ' heading -> its text up to the next '## ' heading; '' -> the whole file."""
    text = path.read_text()
    out, current, buf = {"": text}, None, []
    for line in text.splitlines():
        if line.startswith("## "):
            if current is not None:
                out[current] = "\n".join(buf)
            current, buf = slug(line[3:]), []
        buf.append(line)
    if current is not None:
        out[current] = "\n".join(buf)
    return out


def numbers_in(text: str) -> set[float]:
    return {float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*(?:\.\d+)?", text)}


def unsourced_figures(text: str) -> list[str]:
    body = prose(text).split("## Back of the envelope")[0]
    bench, readme = sections(ROOT / "docs/benchmarks.md"), (ROOT / "README.md").read_text()
    bad = []
    for para in re.split(r"\n\s*\n|\n(?=- )", body):
        # link targets are no figures; a figure "in quotes" is a claim we quote, not a result of ours
        bare = re.sub(r'"[^"\n]*"', "", re.sub(r"\]\([^)]*\)", "]", para))
        figures = [m for m in FIGURE.finditer(bare) if m.group(0) not in SETTINGS]
        if not figures:
            continue
        links = LINK.findall(para)
        if not links and re.search(r"tests/(?:\w+/)*test_\w+\.py", para):
            continue  # measured by the test it names
        if not links:
            bad.append(f"no source linked for {[m.group(0) for m in figures]} in: {para.strip()[:100]}...")
            continue
        source = "\n".join(readme if page.endswith("README.md") else bench.get(anchor, "") for page, anchor in links)
        have = numbers_in(source)
        for m in figures:
            for n in filter(None, (m.group(1), m.group(2))):
                if float(n.replace(",", "")) not in have:
                    bad.append(f"{m.group(0)}: {n} not in {[a or p for p, a in links]}: {para.strip()[:80]}...")
    return bad


def test_every_interview_figure_is_in_its_source():
    bad = unsourced_figures((ROOT / "docs/interview.md").read_text())
    assert not bad, "\n".join(bad)


def test_links_resolve_to_sections():
    assert anchors(ROOT / "docs/benchmarks.md") >= set(sections(ROOT / "docs/benchmarks.md")) - {""}


def test_the_check_can_fail():
    text = (
        "Measured ([benchmarks §2](benchmarks.md#2-step-time-the-hand-written-ddps-against-torchs-ddp)): "
        "1.138 x slower, 99.9 ms.\n\nAnd 12.3% with no link.\n"
    )
    bad = unsourced_figures(text)
    assert len(bad) == 2 and bad[0].startswith("99.9 ms") and bad[1].startswith("no source"), bad


def table_rows(text: str) -> list[str]:
    """The rows of the first Markdown table in `text` that starts with `| run |`, header included."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| run |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line.strip())
    return rows


def test_readme_main_table_is_its_source():
    """The README's main-job table is benchmarks.md §1's, row for row (one measurement, two copies)."""
    readme = (ROOT / "README.md").read_text()
    source = sections(ROOT / "docs/benchmarks.md")["1-the-main-job-1-process-vs-native-ddp-vs-hand-written-ddp"]
    assert table_rows(readme) == table_rows(source), "README.md's main table differs from benchmarks.md §1"
    assert len(table_rows(readme)) == 5 and "(docs/benchmarks.md#1-the-main-job" in readme
    assert table_rows("x\n| run | a |\n|---|---|\n| none | 30.8 |\n") != table_rows(source)  # can fail
