"""Reading Markdown as GitHub renders it: fenced code dropped, headings' anchors (GitHub's slugs).

The docs tests share these: tests/docs/test_docs_links.py checks that every link and #anchor
resolves, tests/docs/test_interview_figures.py that each figure of docs/interview.md is in the
section it links.
"""

from __future__ import annotations

import re
from pathlib import Path

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def prose(text: str) -> str:
    """The Markdown without its fenced code blocks (a link in a code block is no link)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (its `github-slugger`): lower case, drop what is not a
    letter, digit, space, `-` or `_`, spaces to `-`. Inline code and links keep their text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every #anchor a Markdown file offers: its headings' slugs (repeats numbered) and explicit ids."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose(path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            k = seen.get(base, 0)
            found.add(base if k == 0 else f"{base}-{k}")
            seen[base] = k + 1
    found.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", path.read_text()))
    return found
