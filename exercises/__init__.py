"""Exercises: write the on-ramp's steps, the ring, the bucket plan and the sampler yourself.

Each file here is a stub: the signature and the docstring of one piece of ddp_from_scratch/,
with `raise NotImplementedError` where you write the code. `make exercise NAME=<file stem>`
(or `python -m exercises <name>`) runs that exercise's tests (tests/docs/test_exercises.py) against
your file and prints PASS, or FAIL with a hint. The same tests run against our solutions in
`make test`. The order, what each teaches and how long it takes: docs/exercises.md.
"""
