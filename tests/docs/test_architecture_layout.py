"""docs/architecture.md's layout tree lists every source file, and only files that exist.

The tree is the code block under "## Layout": two spaces of indent per folder level, a name
ending in "/" is a folder, a name may carry a path ("ddp_native/__init__.py"). Every Python
file of the packages below (but `__init__.py`) must appear in it, and every file it names must
exist, so adding, renaming or removing a file means updating the tree in the same commit.
"""

from __future__ import annotations

import re
import subprocess

from support.paths import ROOT

PACKAGES = ("ddp_from_scratch", "ddp_native", "experiments", "server", "exercises")


def tree_paths(text: str) -> set[str]:
    """Paths (relative to the repository root) named by the first code block after '## Layout'."""
    block = re.search(r"^## Layout\n.*?```\n(.*?)```", text, re.S | re.M).group(1)
    paths, stack = set(), []
    for line in block.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        stack = stack[:depth]
        path = "".join(stack) + name
        paths.add(path.rstrip("/"))
        if name.endswith("/"):
            stack.append(name)
    return paths


def source_files() -> set[str]:
    out = subprocess.run(["git", "ls-files", *PACKAGES], cwd=ROOT, capture_output=True, text=True, check=True)
    files = {f for f in out.stdout.split() if f.endswith(".py") and not f.endswith("__init__.py")}
    untracked = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return files | {f for f in untracked if not f.endswith("__init__.py") and "__pycache__" not in f}


def test_layout_lists_every_source_file():
    listed = tree_paths((ROOT / "docs/architecture.md").read_text())
    missing = sorted(source_files() - listed)
    assert not missing, f"docs/architecture.md's layout tree does not list: {missing}"


def test_layout_names_only_files_that_exist():
    listed = tree_paths((ROOT / "docs/architecture.md").read_text())
    gone = sorted(p for p in listed if not (ROOT / p).exists())
    assert not gone, f"docs/architecture.md's layout tree names files that do not exist: {gone}"


def test_the_tree_parser_can_fail():
    text = "## Layout\n\n```\na/     x\n  b.py   y\n  c/   z\n    d.py  w\ne.py  v\n```\n"
    assert tree_paths(text) == {"a", "a/b.py", "a/c", "a/c/d.py", "e.py"}
