"""One rank of a benchmark part: `python -m experiments.bench.common --part P ...` (started by launch.py)."""

from .launch import rank_main

rank_main()
