"""Where the tests find the repository and what lies beside the clone: the real AG News rows in ../shared/ag_news.

`ROOT` is the repository root, whatever folder of tests/ a file sits in. One home for the data path
and its skip: the `ag_news` fixture (tests/conftest.py) for a test that takes it, `AG_NEWS` and the
`needs_ag_news` mark for a file that builds command lines at import time.

Why a module and not conftest.py: tests/gpu/ has its own conftest.py, so `from conftest import ...`
would name whichever of the two was imported last; `support.paths` names one file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # tests/support/paths.py
AG_NEWS = ROOT.parent / "shared" / "ag_news"  # real AG News CSVs (SOURCES.md there); never copied into the repo
NEEDS_AG_NEWS = "needs ../shared/ag_news"
needs_ag_news = pytest.mark.skipif(not AG_NEWS.exists(), reason=NEEDS_AG_NEWS)
