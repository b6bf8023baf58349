"""The configuration of a training run: one typed field per option, its default, help and checks.

`TrainConfig` is the reference of what a run can be asked to do: the command line of
experiments.train is built from its fields (`parse_args`), so the two never drift apart. A field
made with `option(..., defines_run=True)` changes what the run computes; `identity()` collects
those (and the world size), and a snapshot continues only a run with the same identity
(experiments/snapshot.py). How a run executes (ddp, parallel, impl, all_reduce, bucket_cap_mb, backend, timeout,
paths, reporting) is not part of it. experiments/compare.py passes any flag it does not know on.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

from distrinews.errors import UsageError

from . import parallel as P

DESCRIPTION = "Train an AG News classifier with data parallelism: the one training loop of the project."


ONE_PROCESS = "none"  # --ddp none: one process, no wrapper (no entry of the table)


def option(default, help: str | None = None, *, defines_run: bool = False, choices=None, type=None, metavar=None):
    """A TrainConfig field and its command-line option `--field-name` (bool fields: a flag).

    Args:
        defines_run: the option changes what the run computes (see `TrainConfig.identity`).
        type: the value's type when the default (None) does not tell it.
    """
    meta = {"help": help, "defines_run": defines_run, "choices": choices, "type": type, "metavar": metavar}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """Every option of `python -m experiments.train` (see each field's help)."""

    ddp: str | None = option(
        None,
        "none: one process, no wrapper; native / scratch: short for --parallel ddp --impl native / scratch"
        " (default: scratch)",
        choices=lambda: [ONE_PROCESS, *P.IMPLEMENTATIONS],
        type=str,
    )
    parallel: str = option(
        P.DDP,
        "what is sharded: ddp (nothing, everything replicated), zero1 (optimizer state), zero2 (and gradients),"
        " fsdp (and parameters: ZeRO-3); the table: experiments/parallel.py",
        choices=P.stages,
    )
    impl: str | None = option(
        None,
        "whose implementation: scratch (ddp_from_scratch/) or native (torch's); default: --ddp's, else scratch",
        choices=lambda: list(P.IMPLEMENTATIONS),
        type=str,
    )
    model: str = option("distilbert", "preset (distilbert, minilm-l6, tiny), hub id or path", defines_run=True)
    data_dir: str | None = option(None, "directory with train.csv/test.csv (ag_news_csv); default: the hub", type=str)
    output_dir: str | None = option(
        None, "default: runs/<ddp>-np<world size> (sharded stages: runs/<parallel>-<impl>-np<world size>)", type=str
    )
    epochs: int = option(1, defines_run=True)
    batch_size: int = option(16, "micro-batch per rank; global batch = this x accumulation x ranks", defines_run=True)
    grad_accum_steps: int = option(
        1,
        "micro-batches per optimizer step (all but the last under no_sync: one all-reduce per step)",
        defines_run=True,
    )
    precision: str = option(
        "fp32",
        "autocast dtype for forward and loss (fp16 adds a gradient scaler); gradients are reduced in fp32",
        defines_run=True,
        choices=["fp32", "fp16", "bf16"],
    )
    eval_batch_size: int = option(64)
    lr: float = option(5e-5, defines_run=True)
    weight_decay: float = option(0.01, defines_run=True)
    warmup_ratio: float = option(0.06, "share of steps with linear warm-up", defines_run=True)
    max_grad_norm: float = option(1.0, "0 disables clipping", defines_run=True)
    max_length: int = option(128, "tokens per text (truncation)", defines_run=True)
    max_train_samples: int | None = option(None, defines_run=True, type=int)
    max_eval_samples: int | None = option(None, "cap on validation and test examples", defines_run=True, type=int)
    val_size: float = option(0.05, "fraction (<1) or count of train held out", defines_run=True)
    seed: int = option(42, defines_run=True)
    dropout: float | None = option(None, "tiny model only", defines_run=True, type=float)
    bucket_cap_mb: float | None = option(
        None,
        "DDP bucket cap in MiB, both implementations (default: torch's, 25 with a 1 MiB first bucket)",
        type=float,
    )
    group_by_length: bool = option(
        False,
        "batches of similar lengths (less padding): experiments/length_grouping.py; evaluation sorted too",
        defines_run=True,
    )
    all_reduce: str = option(
        "torch",
        "--impl scratch: the collectives of every stage (DDP's all-reduce, ZeRO's and FSDP's all-gather and"
        " reduce-scatter): torch.distributed's or our ring",
        choices=["torch", "ring"],
    )
    sparse_embeddings: str = option(
        "auto",
        "--ddp scratch: exchange the word embedding's gradient by the rows looked up (ddp_from_scratch/sparse.py;"
        " auto: embeddings of 4 MiB and more); exact either way",
        choices=["auto", "on", "off"],
    )
    wrapper: str | None = option(
        None,
        "--ddp scratch: your own DDP wrapper in place of ours, e.g. exercises.step4_buckets (a module holding one"
        " nn.Module wrapper, or MODULE:NAME): experiments/own_wrapper.py, docs/exercises.md",
        type=str,
        metavar="MODULE",
    )
    comm_hook: str = option(
        "none",
        "--parallel ddp|zero1: what each bucket's all-reduce sends: none (float32, exact), fp16 or bf16 (half the"
        " bytes, every gradient rounded to 16 bits: torch's fp16/bf16_compress_hook, ours"
        " ddp_from_scratch/comm_hooks.py); under a hook ours sends the word embedding dense, as torch does",
        defines_run=True,
        choices=["none", "fp16", "bf16"],
    )
    backend: str = option("auto", choices=["auto", "gloo", "nccl"])
    timeout: float = option(300.0, "process-group timeout, seconds")
    cache_dir: str = option(os.path.join(".cache", "tokenized"), "tokenized-data cache")
    no_test: bool = option(False, "skip the final test-set evaluation")
    no_save: bool = option(False, "skip writing the checkpoint")
    save_every: int = option(0, "also write a snapshot every N optimizer steps (default 0: at every epoch end only)")
    keep_snapshots: int = option(2, "how many snapshots to keep (newest first)")
    no_snapshots: bool = option(False, "write no snapshot at all (the run cannot resume)")
    resume: str | None = option(
        None,
        "continue from the newest usable snapshot in --output-dir (auto) or from PATH",
        type=str,
        metavar="auto|PATH",
    )
    report_to: str = option(
        "none",
        "also write the step scalars for TensorBoard (event files in --output-dir: tensorboard --logdir it);"
        " metrics.jsonl is written either way",
        choices=["none", "tensorboard"],
    )

    def problems(self) -> list[str]:
        """What is wrong with these values, each with the option to fix (empty: nothing)."""
        found = [
            f"--{name.replace('_', '-')} must be at least 1"
            for name in ("epochs", "batch_size", "eval_batch_size", "max_length", "grad_accum_steps")
            if getattr(self, name) < 1
        ]
        if self.bucket_cap_mb is not None and self.bucket_cap_mb <= 0:
            found.append("--bucket-cap-mb must be positive")
        if self.save_every < 0 or self.keep_snapshots < 1:
            found.append("--save-every must be >= 0 and --keep-snapshots >= 1")
        return found + self._parallel_problems()

    def _parallel_problems(self) -> list[str]:
        """The combinations of --ddp / --parallel / --impl / --precision / --comm-hook that do not exist."""
        if self.ddp == ONE_PROCESS and (self.parallel != P.DDP or self.impl is not None):
            return [
                "--ddp none is one process without a wrapper: drop --parallel/--impl, or use"
                f" --parallel {self.parallel} --impl {self.impl or P.DEFAULT_IMPL} under torchrun"
            ]
        if self.ddp not in (None, ONE_PROCESS) and self.impl not in (None, self.ddp):
            return [f"--ddp {self.ddp} and --impl {self.impl} disagree: give one of them"]
        resolved = self.resolved()
        strategy = resolved.strategy
        if resolved.ddp != ONE_PROCESS and strategy is None:
            return [P.missing_note(self.parallel, resolved.impl)]
        if self.comm_hook != "none" and (strategy is None or not strategy.comm_hook):
            where = "one process has none" if strategy is None else f"--parallel {self.parallel} reduce-scatters"
            return [
                f"--comm-hook {self.comm_hook} compresses a DDP bucket's all-reduce, and {where}:"
                " use it with --parallel ddp or zero1 under torchrun, or drop it"
            ]
        if self.wrapper and (strategy is None or strategy.key != (P.DDP, P.DEFAULT_IMPL)):
            return [f"--wrapper {self.wrapper} takes the place of our DDP: use it with --ddp scratch under torchrun"]
        if self.wrapper and (self.comm_hook != "none" or self.grad_accum_steps > 1):
            return [
                f"--wrapper {self.wrapper}: the exercises' wrappers have no comm hooks and no no_sync: drop"
                " --comm-hook and --grad-accum-steps"
            ]
        if strategy is None:
            return []
        from .features import missing

        lacking = missing(strategy.needs)
        if lacking:
            return [
                f"--parallel {self.parallel} --impl {resolved.impl} {lacking}: use --impl {P.DEFAULT_IMPL} (ours),"
                " or a newer torch"
            ]
        if self.precision not in strategy.precisions:
            return [f"--precision {self.precision} with --parallel {self.parallel}: {strategy.refused}"]
        return []

    def resolved(self) -> TrainConfig:
        """`--ddp` and `--impl` brought to one form: `ddp` is "none" or the implementation
        (native / scratch), `impl` the same (None for none); `parallel` what is sharded."""
        if self.ddp == ONE_PROCESS:
            return self
        impl = self.impl or self.ddp or P.DEFAULT_IMPL
        return dataclasses.replace(self, ddp=impl, impl=impl)

    @property
    def strategy(self) -> P.Strategy | None:
        """The table's entry this (resolved) config names; None for one process or a combination not in it."""
        return None if self.ddp == ONE_PROCESS else P.lookup(self.parallel, self.impl or self.ddp or P.DEFAULT_IMPL)

    def check(self) -> TrainConfig:
        """`self` resolved, or UsageError naming the first problem (for a config made in code, not parsed)."""
        if self.problems():
            raise UsageError(self.problems()[0])
        return self.resolved()

    def identity(self, world_size: int) -> dict:
        """What defines the run: the fields made with `defines_run=True`, and the world size."""
        run = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["defines_run"]}
        return {**run, "world_size": world_size}

    def to_argv(self) -> list[str]:
        """This config as experiments.train's command line: one flag per field that differs from its default,
        in field order (`--flag` for a set bool, `--flag VALUE` else); `parse_args(c.to_argv())` gives back
        `c.resolved()`. Compare, the tests and the benchmarks write a run's options through it."""
        argv = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            flag = "--" + f.name.replace("_", "-")
            argv += [flag] if value is True else [flag, str(value)]
        return argv

    def as_dict(self) -> dict:
        """Every option by field name (summary.json's `args`, the checkpoint's training record)."""
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one option per TrainConfig field, in field order."""
    p = argparse.ArgumentParser(prog="python -m experiments.train", description=DESCRIPTION)
    for f in dataclasses.fields(TrainConfig):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        if f.default is False:
            p.add_argument(flag, action="store_true", help=meta["help"])
            continue
        kind = meta["type"] or type(f.default)
        choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]  # the table's, as of now
        p.add_argument(flag, type=kind, default=f.default, choices=choices, help=meta["help"], metavar=meta["metavar"])
    return p


def parse_args(argv=None) -> TrainConfig:
    """The options of one run (a bad value exits with status 2 and says which, as argparse does)."""
    p = build_parser()
    config = TrainConfig(**vars(p.parse_args(argv)))
    for problem in config.problems()[:1]:
        p.error(problem)
    return config.resolved()
