"""What every benchmark part shares, one job per module:

- launch.py: starting ranks (`launch_ranks`: torchrun runs a part's `worker` on N ranks, each
  result back as JSON; `run_training`: a whole `experiments.train` run; `run_command`).
- wrappers.py: the model and batches of a worker, the DDP wrappers with their bucket all-reduces
  timed (`wrap`), and `timed_step`: the training step (experiments/step.py) with clocks around it.
- intervals.py: the arithmetic of intervals (`union_length`, `overlap`, medians of ratios).
- report.py: what a part writes and prints (`write_result`, `part_main`, `machine`, `pyplot`).

Nothing here holds state between calls: a worker's device comes from its process group.
"""
