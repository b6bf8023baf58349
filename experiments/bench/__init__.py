"""The measurements: `python -m experiments.bench` (see __main__.py); shared pieces in common/ (one module per job)."""
