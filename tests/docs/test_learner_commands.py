"""Commands a learner copies work on a learner's clone: none needs ../shared but the labelled offline route.

A learner's clone has no ../shared beside it (that is this machine's copy of AG News). Every
command in a fenced code block of README.md and docs/*.md that names `../shared` must be the
offline route, labelled as such: "offline route" on that line, on one of the two lines above it
in the block, or in the three lines of prose above the block. Every other command takes the hub
route (no --data-dir: AG News from the Hugging Face hub). A program's output quoted in
a block (a line starting with `error:`) is no command.
"""

from __future__ import annotations

import re

from support.paths import ROOT

OUTPUT = ("error:", "[rank")  # lines of a program's output shown in a block, not commands
PAGES = sorted(str(p.relative_to(ROOT)) for p in [ROOT / "README.md", *ROOT.glob("docs/*.md")] if p.exists())


def unlabelled_shared_commands(text: str) -> list[str]:
    """Lines of fenced code blocks naming ../shared without an "offline route" label near them."""
    bad, lines = [], text.splitlines()
    in_block, block_start = False, 0
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            in_block, block_start = not in_block, i
            continue
        if in_block and "../shared" in line and not line.startswith(OUTPUT):
            near = lines[max(block_start + 1, i - 2) : i + 1] + lines[max(0, block_start - 3) : block_start]
            if not any("offline route" in x.lower() for x in near):
                bad.append(f"line {i + 1}: {line.strip()}")
    return bad


def test_no_learner_command_needs_shared_but_the_offline_route():
    bad = {}
    for page in PAGES:
        found = unlabelled_shared_commands((ROOT / page).read_text())
        if found:
            bad[page] = found
    assert not bad, f"commands naming ../shared outside the labelled offline route: {bad}"


def test_the_offline_route_is_there_labelled():
    """The README names the offline route and links it; docs/running.md gives its command, with a
    placeholder for the learner's own directory; the README names no path of our machines at all."""
    readme, running = (ROOT / "README.md").read_text(), (ROOT / "docs" / "running.md").read_text()
    assert "offline route" in readme.lower() and "docs/running.md#offline-route" in readme
    assert re.search(r"offline route.*\n.*--data-dir path/to/ag_news_csv --model minilm-l6", running, re.I)
    assert "../shared" not in readme


def test_the_check_can_fail():
    text = "Run:\n\n```bash\npython -m x --data-dir ../shared/ag_news\n```\n\nOffline route:\n```\nrun ../shared\n```\n"
    assert unlabelled_shared_commands(text) == ["line 4: python -m x --data-dir ../shared/ag_news"]
