"""Every code reference in the learning guides points at something that exists.

In docs/interview.md (and the other guides) a reference is a backticked `path` or
`path:function` (`Class.method` allowed), relative to the repository root, e.g.
`ddp_from_scratch/reducer.py:Reducer._mark_variable_ready`. The file must exist; the function, class or
method must be defined in it. Relative Markdown links ([text](file.md#anchor)) must name a file
that exists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = [
    "docs/interview.md",
    "docs/checklist.md",
    "docs/setup.md",
    "docs/fault-tolerance.md",
    "docs/kaggle.md",
    "docs/deploy.md",
    "CONTRIBUTING.md",
]
REF = re.compile(r"`((?:[\w.-]+/)*[\w.-]+\.(?:py|md|toml|sh))(?::([\w.]+))?`")
LINK = re.compile(r"\]\(((?!https?://)[^)#\s]+)(?:#[^)]*)?\)")


def defined_names(path: Path) -> set[str]:
    """'f', 'C' and 'C.m' for every function, class and method defined in a Python file."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(
                f"{node.name}.{n.name}"
                for n in node.body
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            )
    return names


def broken_references(doc: Path) -> list[str]:
    text, bad = doc.read_text(), []
    for path, func in REF.findall(text):
        target = ROOT / path
        if ("/" not in path or path.startswith(("runs/", ".venv/"))) and not target.exists():
            continue  # a bare file name (`train.py`) is prose, runs/ holds outputs; references carry their directory
        if not target.exists():
            bad.append(f"{path}: no such file")
        elif func and func not in defined_names(target):
            bad.append(f"{path}:{func}: not defined there")
    for link in LINK.findall(text):
        if not (doc.parent / link).exists():
            bad.append(f"link {link}: no such file")
    return bad


@pytest.mark.parametrize("guide", GUIDES)
def test_references_exist(guide):
    doc = ROOT / guide
    assert doc.exists(), guide
    assert not broken_references(doc), broken_references(doc)


def test_interview_guide_links_code_for_its_answers():
    refs = REF.findall((ROOT / "docs/interview.md").read_text())
    assert len([1 for path, func in refs if path.endswith(".py") and func]) >= 15


def test_the_checker_can_fail(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "See `ddp_from_scratch/reducer.py:Reducer._mark_variable_ready`, `ddp_from_scratch/reducer.py:Nope`, "
        "`ddp_from_scratch/gone.py` and [here](missing.md)."
    )
    assert broken_references(doc) == [
        "ddp_from_scratch/reducer.py:Nope: not defined there",
        "ddp_from_scratch/gone.py: no such file",
        "link missing.md: no such file",
    ]
