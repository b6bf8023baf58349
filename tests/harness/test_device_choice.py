"""Device choice and precision checks that need a GPU to matter, tested on the CPU by faking torch.cuda's answers."""

from __future__ import annotations

import warnings

import pytest
import torch

from distrinews.errors import DistributedSetupError
from experiments import distributed as D
from experiments import precision as P


def fake_gpus(monkeypatch, count: int, capability=(8, 0)) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")


def test_one_visible_gpu_per_process_picks_nccl_and_cuda0(monkeypatch):
    # SLURM / Kubernetes: two ranks on this machine, each sees only its own GPU
    fake_gpus(monkeypatch, 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert D.choose_backend("auto", 2) == "nccl"
    assert D.choose_backend("nccl", 2) == "nccl"
    assert D.rank_device(1) == torch.device("cuda", 0)
    assert D.rank_device(0) == torch.device("cuda", 0)


def test_one_gpu_shared_by_two_ranks_stays_gloo_or_refuses(monkeypatch):
    fake_gpus(monkeypatch, 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert D.choose_backend("auto", 2) == "gloo"  # NCCL refuses two ranks on one GPU
    with pytest.raises((SystemExit, DistributedSetupError), match="one GPU per rank"):  # typed after the errors change
        D.choose_backend("nccl", 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # names two, sees one: not the per-process form
    assert D.choose_backend("auto", 2) == "gloo"


def test_every_gpu_visible_picks_cuda_local_rank(monkeypatch):
    fake_gpus(monkeypatch, 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert D.choose_backend("auto", 2) == "nccl"
    assert D.rank_device(1) == torch.device("cuda", 1)
    fake_gpus(monkeypatch, 2)
    with pytest.raises(DistributedSetupError, match="LOCAL_RANK=2 but this process sees 2 GPU"):
        D.rank_device(2)


def test_no_gpu_is_gloo(monkeypatch):
    fake_gpus(monkeypatch, 0)
    assert D.choose_backend("auto", 1) == "gloo"


@pytest.mark.parametrize(("capability", "warns"), [((7, 5), True), ((7, 0), True), ((8, 0), False), ((9, 0), False)])
def test_bf16_warns_below_compute_capability_8(monkeypatch, capability, warns):
    fake_gpus(monkeypatch, 1, capability)
    cuda = torch.device("cuda", 0)
    message = P.bf16_warning("bf16", cuda)
    assert (message is not None) == warns
    if warns:
        assert f"compute capability {capability[0]}.{capability[1]}" in message and "--precision fp16" in message
        with pytest.warns(UserWarning, match="emulates it"):
            assert P.make_scaler("bf16", cuda) is None
    assert P.bf16_warning("fp16", cuda) is None and P.bf16_warning("bf16", torch.device("cpu")) is None


def test_no_warning_on_cpu_bf16():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert P.make_scaler("bf16", torch.device("cpu")) is None
