"""Exercises: write the sampler, the on-ramp's four steps, the ring and the bucket plan yourself.

Each file here is a stub: the signature and the docstring of one piece of ddp_from_scratch/,
with `raise NotImplementedError` where you write the code. `make exercise NAME=<file stem>`
(or `python -m exercises <name>`) runs that exercise's tests (tests/docs/test_exercises.py) against
your file, alone, and prints PASS or FAIL; `python -m exercises <name> --hint` gives a hint, in
stages (exercises/hints.py). The same tests run against our solutions in `make test`. Once a step
passes, train AG News with it: `--wrapper exercises.step4_buckets` (experiments/own_wrapper.py).
The order, what each teaches and how long it takes: docs/exercises.md.
"""
