"""Every code reference in the learning guides points at something that exists.

In docs/interview.md (and the other guides) a reference is a backticked `path` or
`path:function` (`Class.method` allowed), relative to the repository root, e.g.
`ddp_from_scratch/reducer.py:Reducer._mark_variable_ready`. The file must exist; the function, class or
method must be defined in it. Relative Markdown links ([text](file.md#anchor), [text](#anchor))
in README.md and every Markdown page of the repository must name a file that exists, and an
#anchor must be a heading of that file, by GitHub's slugs: lower case, punctuation but `-` and
`_` dropped, spaces to `-`, `-1`, `-2`... for repeats (or an explicit `<a id="...">`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from support.markdown import anchors, prose, slug
from support.paths import ROOT

GUIDES = [  # the pages whose backticked code references are checked
    "docs/interview.md",
    "docs/checklist.md",
    "docs/setup.md",
    "docs/fault-tolerance.md",
    "docs/kaggle.md",
    "docs/deploy.md",
    "docs/exercises.md",
    "docs/glossary.md",
    "docs/ddp-in-one-page.md",
    "CONTRIBUTING.md",
]
PAGES = sorted(  # every Markdown page: links and anchors checked
    str(p.relative_to(ROOT))
    for p in [*ROOT.glob("*.md"), *ROOT.glob("docs/**/*.md"), *ROOT.glob("deploy/**/*.md"), *ROOT.glob("kaggle/*.md")]
)
REF = re.compile(r"`((?:[\w.-]+/)*[\w.-]+\.(?:py|md|toml|sh))(?::([\w.]+))?`")
LINK = re.compile(r"\]\(((?!https?://|mailto:)[^)#\s]*)(?:#([^)\s]*))?\)")


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


def broken_references(doc: Path, code: bool = True) -> list[str]:
    """What in `doc` points nowhere: code references (if `code`), links, anchors."""
    text, bad = doc.read_text(), []
    for path, func in REF.findall(text) if code else []:
        target = ROOT / path
        if ("/" not in path or path.startswith(("runs/", ".venv/"))) and not target.exists():
            continue  # a bare file name (`train.py`) is prose, runs/ holds outputs; references carry their directory
        if not target.exists():
            bad.append(f"{path}: no such file")
        elif func and func not in defined_names(target):
            bad.append(f"{path}:{func}: not defined there")
    for link, anchor in LINK.findall(prose(text)):
        target = (doc.parent / link) if link else doc
        if not target.exists():
            bad.append(f"link {link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            bad.append(f"link {link}#{anchor}: no such heading in {target.relative_to(ROOT)}")
    return bad


@pytest.mark.parametrize("guide", GUIDES)
def test_references_exist(guide):
    doc = ROOT / guide
    assert doc.exists(), guide
    assert not broken_references(doc), broken_references(doc)


@pytest.mark.parametrize("page", PAGES)
def test_links_and_anchors_resolve(page):
    bad = broken_references(ROOT / page, code=False)
    assert not bad, bad


def test_every_page_is_checked():
    assert {"README.md", "docs/concepts.md", "docs/benchmarks.md", "docs/debugging.md"} <= set(PAGES)


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


def test_the_anchor_checker_can_fail():
    doc = ROOT / "docs" / "_anchor_check_tmp.md"
    doc.write_text(
        "# Stepping through `reducer.py`: a, b\n## Same\n## Same\n[ok](#stepping-through-reducerpy-a-b) "
        "[ok](#same-1) [bad](#same-2) [ok](concepts.md) [bad](concepts.md#no-such-heading)\n"
        "```\n[in code](#nowhere)\n```\n"
    )
    try:
        assert broken_references(doc) == [
            "link #same-2: no such heading in docs/_anchor_check_tmp.md",
            "link concepts.md#no-such-heading: no such heading in docs/concepts.md",
        ]
    finally:
        doc.unlink()


def test_slugs_follow_github():
    assert slug("Stepping through reducer.py: `_mark_variable_ready`, `_finalize_backward`") == (
        "stepping-through-reducerpy-_mark_variable_ready-_finalize_backward"
    )
    assert slug("10. Ring vs gloo (25 MB, 2 & 4 ranks)") == "10-ring-vs-gloo-25-mb-2--4-ranks"
