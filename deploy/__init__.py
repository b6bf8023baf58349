"""Deployment helpers run from the repository root: `python -m deploy.prepare` (docs/deploy.md)."""
