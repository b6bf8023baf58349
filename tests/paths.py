"""Where the tests find what lies beside the clone: the real AG News rows in ../shared/ag_news.

One home for the path and its skip: the `ag_news` fixture (tests/conftest.py) for a test that takes
it, `AG_NEWS` and the `needs_ag_news` mark for a file that builds command lines at import time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AG_NEWS = ROOT.parent / "shared" / "ag_news"  # real AG News CSVs (SOURCES.md there); never copied into the repo
NEEDS_AG_NEWS = "needs ../shared/ag_news"
needs_ag_news = pytest.mark.skipif(not AG_NEWS.exists(), reason=NEEDS_AG_NEWS)
