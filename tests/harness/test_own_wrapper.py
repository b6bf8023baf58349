"""A learner's own wrapper in the real training (`experiments.train --wrapper MODULE`, experiments/own_wrapper.py).

- On 2 ranks, `--wrapper ddp_from_scratch.minimal_buckets` (the solution of exercise step4_buckets: the
  class a learner writes) and `--wrapper ddp_from_scratch.explicit` (step 1's `sync_gradients`, run at the
  end of backward) end with the weights of `--ddp native`, bit for bit: every correct average of two
  float32 gradients is the same number (one addition; dividing by 2 is exact), so the same gradients,
  clipping and AdamW steps follow. The wrapper run also writes TensorBoard events (as experiments.compare
  asks), which our DDP's timing would otherwise hook into.
- Cheap: an unfinished exercise (a class still raising NotImplementedError) is refused with a message
  naming the exercise; the combinations that make no sense are refused by TrainConfig.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from support.paths import needs_ag_news
from support.torchrun import ok, torchrun
from support.training import tiny_train_args

from distrinews.errors import UsageError
from experiments import own_wrapper
from experiments.train_args import TrainConfig


def _train(tmp_path, name: str, flags: list[str]) -> str:
    args = tiny_train_args(
        tmp_path / name,
        cache_dir=tmp_path / "cache",
        max_train_samples=96,
        max_eval_samples=32,
        no_test=True,
        no_snapshots=True,
        batch_size=4,
    )
    return ok(torchrun(2, ["-m", "experiments.train", *args, *flags]))


def _weights(run_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


@pytest.mark.slow  # three 2-rank trainings of the tiny model on 96 rows: 62 s at load average 9.7
@needs_ag_news
def test_own_wrapper_trains_like_torchs_ddp(tmp_path):
    _train(tmp_path, "native", ["--ddp", "native"])
    out = _train(tmp_path, "buckets", ["--wrapper", "ddp_from_scratch.minimal_buckets", "--report-to", "tensorboard"])
    assert "gradients averaged by BucketedDistributedDataParallel, your code" in out
    out = _train(tmp_path, "explicit", ["--wrapper", "ddp_from_scratch.explicit"])
    assert "gradients averaged by AfterBackward" in out
    native = _weights(tmp_path / "native")
    for run in ("buckets", "explicit"):
        mine = _weights(tmp_path / run)
        assert mine.keys() == native.keys()
        for k in native:
            assert torch.equal(mine[k], native[k]), f"--wrapper ({run}): {k} differs from torch's DDP"


def test_unfinished_exercise_is_refused(tmp_path, monkeypatch):
    (tmp_path / "half_done.py").write_text(
        textwrap.dedent(
            """
            import torch.nn as nn

            class Mine(nn.Module):
                def __init__(self, module):
                    super().__init__()
                    raise NotImplementedError("exercise 5: fill the bucket")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("half_done", None)
    with pytest.raises(UsageError, match="still raises NotImplementedError.*python -m exercises half_done"):
        own_wrapper.load("half_done")
    with pytest.raises(UsageError, match="cannot import"):
        own_wrapper.load("no_such_module_here")


def test_wrapper_only_replaces_our_ddp():
    assert TrainConfig(wrapper="exercises.step4_buckets").problems() == []
    for bad in (
        {"ddp": "native"},
        {"ddp": "none"},
        {"parallel": "zero1"},
        {"comm_hook": "fp16"},
        {"grad_accum_steps": 2},
    ):
        problems = TrainConfig(wrapper="exercises.step4_buckets", **bad).problems()
        assert problems and "--wrapper" in problems[0], (bad, problems)
