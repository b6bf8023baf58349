"""Helpers the test files share, one module per subject; never a test file importing another.

pyproject.toml puts tests/ on sys.path (`pythonpath = ["tests"]`), so any test, in any folder,
imports them as `from support.<module> import ...`; so do the ranks that `support.spawn.run`
starts, which inherit the parent's sys.path. The map of modules is in tests/README.md.
"""
