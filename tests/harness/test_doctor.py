"""`python -m experiments.doctor`: passes on this CPU in seconds; a taken port fails with what to do."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
from support.paths import ROOT


def doctor(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "experiments.doctor", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    return r, time.monotonic() - t0


def test_doctor_passes_on_cpu_in_seconds():
    r, seconds = doctor("--nproc", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    expected = [
        "torch ",
        "gloo available",
        "ok: dist.all_reduce (gloo), 2 ranks",
        "ok: our ring all-reduce, 2 ranks",
        "ok: our ring all-reduce, asynchronous",
        "ok: our broadcast",
        "OK: data-parallel training",
    ]
    for line in expected:
        assert line in r.stdout, (line, r.stdout)
    assert seconds < 30


def test_taken_port_fails_with_what_to_do():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r, _ = doctor("--nproc", "2", "--master-port", str(port))
    assert r.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in r.stdout and "--master-port" in r.stdout, r.stdout


def test_nccl_without_gpus_fails_with_what_to_do():
    r, _ = doctor("--nproc", "2", "--backend", "nccl")
    assert r.returncode == 1 and "needs one GPU per rank" in r.stdout and "--backend gloo" in r.stdout, r.stdout


def test_zero_ranks_is_a_usage_error(capsys):
    from experiments.doctor import main

    with pytest.raises(SystemExit) as e:
        main(["--nproc", "0"])
    assert e.value.code == 2 and "--nproc must be at least 1" in capsys.readouterr().err


def test_the_nccl_p2p_fallback_runs_once_more_without_peer_to_peer(monkeypatch, capsys):
    """`with_p2p_fallback`, the one home of the rule (the doctor's check and the GPU check's two-GPU steps)."""
    from experiments.doctor import P2P_OFF, with_p2p_fallback

    monkeypatch.delenv("NCCL_P2P_DISABLE", raising=False)
    seen = []
    assert with_p2p_fallback(lambda env: seen.append(env) or bool(env), "nccl") == P2P_OFF == {"NCCL_P2P_DISABLE": "1"}
    assert seen == [{}, P2P_OFF] and "export NCCL_P2P_DISABLE=1" in capsys.readouterr().out
    seen.clear()
    assert with_p2p_fallback(lambda env: seen.append(env) or True, "nccl") == {} and seen == [{}]
    assert with_p2p_fallback(lambda env: seen.append(env) or False, "nccl") is None and seen[1:] == [{}, P2P_OFF]
    seen.clear()
    assert with_p2p_fallback(lambda env: seen.append(env) or False, "gloo") is None and seen == [{}]  # no NCCL
    monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
    seen.clear()
    assert with_p2p_fallback(lambda env: seen.append(env) or False, "nccl") is None and seen == [{}]  # already off
