"""The command line of a short real training: experiments.train on the tiny model and real AG News rows.

`tiny_train_args(out_dir, ...)` is that argv without `python -m experiments.train` (prepend it for a
command; pass it as is to `parse_args` or `main`): `--data-dir <AG_NEWS> --model tiny`, the sample
counts, `--max-length 32`, `--epochs 1`, then one flag per further keyword argument, then
`--cache-dir` and `--output-dir` when given. A keyword is the flag's name with `_` for `-`:
`batch_size=4` -> `--batch-size 4`, `no_test=True` -> `--no-test`; None or False leaves the flag out
(`epochs=None`: the option's default). Each test file keeps its own values; this says the shape once.
"""

from __future__ import annotations

from pathlib import Path

from support.paths import AG_NEWS


def tiny_train_args(
    out_dir: Path | None,
    *,
    max_train_samples: int,
    max_eval_samples: int,
    cache_dir: Path | None = None,
    max_length: int = 32,
    epochs: int | None = 1,
    **flags,
) -> list[str]:
    """experiments.train's options for the tiny model on `max_train_samples` real rows (see the module's docstring)."""
    args = ["--data-dir", str(AG_NEWS), "--model", "tiny"]
    args += ["--max-train-samples", str(max_train_samples), "--max-eval-samples", str(max_eval_samples)]
    args += ["--max-length", str(max_length)]
    if epochs is not None:
        args += ["--epochs", str(epochs)]
    for name, value in flags.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    if cache_dir is not None:
        args += ["--cache-dir", str(cache_dir)]
    if out_dir is not None:
        args += ["--output-dir", str(out_dir)]
    return args
