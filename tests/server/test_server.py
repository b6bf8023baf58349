"""Tests for the HTTP inference server (server/), on a randomly initialised `tiny` checkpoint.

TestClient re-raises any exception that reaches the app's 500 handler, so every
bad-input test below also proves that input is answered with a 4xx, never a 500.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from starlette.testclient import TestClient
from support.paths import ROOT
from support.served_model import assert_told_apart

from experiments.model import LABELS
from server import ServerConfig, create_app
from server.predictor import load_model_predictor

TEXTS = [
    "Oil prices fell as stocks rallied on Wall Street",
    "The Lakers beat the Celtics 102-99",
    "NASA launches a new probe to Jupiter's moons, hoping to find water under the ice",
]
LIMITS = dict(max_text_chars=1000, max_batch_size=4, max_body_bytes=20_000)


@pytest.fixture(scope="module")
def client(checkpoint, wait_ready):
    with TestClient(
        create_app(checkpoint, ServerConfig(**LIMITS))
    ) as c:  # `with` runs the lifespan (starts the model load)
        wait_ready(c)
        yield c


def check_prediction(p: dict) -> None:
    assert set(p) == {"label", "label_id", "confidence", "probabilities"}
    probs = p["probabilities"]
    assert list(probs) == list(LABELS)
    assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-5)
    assert all(0.0 <= v <= 1.0 for v in probs.values())
    assert p["label"] in LABELS and LABELS[p["label_id"]] == p["label"]
    assert p["label"] == max(probs, key=probs.get)
    assert p["confidence"] == probs[p["label"]]


def test_health(client, checkpoint):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model"] == "tiny" and body["checkpoint"] == str(checkpoint)
    assert body["labels"] == list(LABELS)
    assert body["limits"].items() >= {**LIMITS, "max_length": 64}.items()  # max_length from training_args.json


def test_predict(client):
    r = client.post("/predict", json={"text": TEXTS[0]})
    assert r.status_code == 200
    check_prediction(r.json())


def test_batch_matches_single_predictions_in_order(client):
    r = client.post("/predict/batch", json={"texts": TEXTS})
    assert r.status_code == 200
    batch = r.json()["predictions"]
    assert len(batch) == len(TEXTS)
    singles = {t: client.post("/predict", json={"text": t}).json() for t in TEXTS}
    assert_told_apart(singles, tolerance=1e-5)  # so a batch answered out of order fails below
    for text, b in zip(TEXTS, batch):
        check_prediction(b)
        single = singles[text]
        assert b["label"] == single["label"] and b["label_id"] == single["label_id"]
        for name in LABELS:  # padding in the batch changes the floats only by rounding
            assert b["probabilities"][name] == pytest.approx(single["probabilities"][name], abs=1e-5)


def test_texts_are_truncated_to_max_length(client):
    # The tiny tokenizer makes one token per letter: both texts share their first 64 tokens.
    a, b = "a b " * 50, "a b " * 50 + "but the end differs"
    pa, pb = (client.post("/predict", json={"text": t}).json() for t in (a, b))
    assert pa == pb


def test_max_length_argument_overrides_training_args(checkpoint):
    with TestClient(create_app(checkpoint, ServerConfig(max_length=16))) as c:
        assert c.get("/health").json()["limits"]["max_length"] == 16


def test_concurrent_requests(client):
    expected = [client.post("/predict", json={"text": t}).json() for t in TEXTS]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: client.post("/predict", json={"text": TEXTS[i % 3]}), range(24)))
    assert all(r.status_code == 200 for r in got)
    assert_told_apart(dict(zip(TEXTS, expected)), tolerance=1e-5)
    for i, r in enumerate(got):
        p, want = r.json(), expected[i % 3]
        assert p["label"] == want["label"]
        assert all(p["probabilities"][k] == pytest.approx(want["probabilities"][k], abs=1e-5) for k in LABELS)


def chunked(*parts: bytes):
    """A request body sent without Content-Length (chunked), so only the bytes read can be counted."""
    yield from parts


BAD = [  # (path, request kwargs, status, words the error must contain)
    ("/predict", {"content": b'{"text": '}, 400, "not valid UTF-8 JSON"),
    ("/predict", {"content": b""}, 400, "body is empty"),
    ("/predict", {"content": b'{"text": "\xff"}'}, 400, "not valid UTF-8 JSON"),
    ("/predict", {"content": b"[" * 5000 + b"]" * 5000}, 400, "not valid UTF-8 JSON"),
    ("/predict", {"json": ["a text"]}, 422, "must be an object"),
    ("/predict", {"json": "a text"}, 422, "must be an object"),
    ("/predict", {"json": {}}, 422, "no 'text' field"),
    ("/predict", {"json": {"texts": ["a"]}}, 422, "POST /predict/batch"),
    ("/predict", {"json": {"text": ""}}, 422, "text is empty"),
    ("/predict", {"json": {"text": " \n\t "}}, 422, "text is empty"),
    ("/predict", {"json": {"text": 42}}, 422, "text must be a string, got a number"),
    ("/predict", {"json": {"text": None}}, 422, "text must be a string, got null"),
    ("/predict", {"json": {"text": ["a"]}}, 422, "text must be a string, got an array"),
    ("/predict", {"json": {"text": "a" * 1001}}, 422, "1001 characters, over the limit of 1000"),
    ("/predict", {"content": b'{"text": "\\ud800"}'}, 422, "unpaired surrogate"),
    ("/predict", {"json": {"text": "a " * 10_001}}, 413, "over the limit of 20000 bytes"),
    ("/predict", {"content": chunked(b'{"text": "', b"a" * 30_000, b'"}')}, 413, "over the limit of 20000 bytes"),
    ("/predict", {"content": b"{}", "headers": {"content-length": "abc"}}, 400, "Content-Length"),
    ("/predict/batch", {"json": {"text": "a"}}, 422, "POST /predict"),
    ("/predict/batch", {"json": {"texts": "a text"}}, 422, "must be a list of strings, got a string"),
    ("/predict/batch", {"json": {"texts": []}}, 422, "empty list"),
    ("/predict/batch", {"json": {"texts": ["a"] * 5}}, 422, "5 items, at most 4"),
    ("/predict/batch", {"json": {"texts": ["a", 1]}}, 422, "texts[1] must be a string"),
    ("/predict/batch", {"json": {"texts": ["a", "b", " "]}}, 422, "texts[2] is empty"),
    ("/predict/batch", {"json": {"texts": ["a", "a" * 1001]}}, 422, "texts[1] has 1001 characters"),
    ("/predict/batch", {"content": b"[1, 2"}, 400, "not valid UTF-8 JSON"),
]


@pytest.mark.parametrize("path,kwargs,status,words", BAD, ids=[f"{p}-{s}-{w}" for p, _, s, w in BAD])
def test_bad_input_is_a_4xx_with_a_clear_error(client, path, kwargs, status, words):
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


@pytest.mark.parametrize(
    "method,path,status",
    [
        ("GET", "/nope", 404),
        ("POST", "/predict/nope", 404),
        ("GET", "/predict", 405),
        ("POST", "/health", 405),
        ("PUT", "/predict/batch", 405),
    ],
)
def test_unknown_path_or_method_is_json(client, method, path, status):
    r = client.request(method, path)
    assert r.status_code == status
    assert path in r.json()["error"] and "POST /predict" in r.json()["error"]  # lists the real endpoints


class BreakingPredictor:
    """The real model until `broken` is set; then every forward pass raises (a bug in the model code)."""

    def __init__(self, checkpoint, pad_id):
        self.real, self.broken = load_model_predictor(checkpoint, pad_id), False

    def __call__(self, ids):
        if self.broken:
            raise RuntimeError("simulated bug")
        return self.real(ids)


def test_unexpected_error_is_a_json_500(checkpoint, wait_ready):
    made: list[BreakingPredictor] = []

    def load(ckpt, pad):
        made.append(BreakingPredictor(ckpt, pad))
        return made[-1]

    with TestClient(create_app(checkpoint, load_predictor=load), raise_server_exceptions=False) as c:
        wait_ready(c)  # the warm-up pass ran with the real forward
        made[0].broken = True
        r = c.post("/predict", json={"text": "hello"})
    assert r.status_code == 500
    assert "internal server error (RuntimeError)" in r.json()["error"]


@pytest.mark.parametrize("make", [lambda tmp: tmp / "missing", lambda tmp: tmp])  # absent; no config.json
def test_bad_checkpoint_dir_fails_at_create_app(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        create_app(path)
    assert str(path) in str(e.value) and "experiments.train" in str(e.value) and "--output-dir" in str(e.value)


def test_cli_bad_checkpoint_exits_with_a_clear_message():
    r = subprocess.run(
        [sys.executable, "-m", "server", "--checkpoint", "/nonexistent"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2  # a usage error (docs/architecture.md); a model that cannot load exits 3
    assert "/nonexistent" in r.stderr and "experiments.train" in r.stderr
    assert "Traceback" not in r.stderr


def test_real_uvicorn_server(checkpoint, tmp_path, free_port):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--checkpoint", str(checkpoint), "--port", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"server exited early:\n{(tmp_path / 'server.log').read_text()}"
            assert time.monotonic() < deadline, f"no /ready after 30 s:\n{(tmp_path / 'server.log').read_text()}"
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:  # not listening yet
                time.sleep(0.2)
        r = httpx.post(f"{url}/predict", json={"text": TEXTS[1]}, timeout=10)
        assert r.status_code == 200
        check_prediction(r.json())
        r = httpx.post(f"{url}/predict", content=b"not json", timeout=10)
        assert r.status_code == 400 and "error" in r.json()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_info_describes_the_model_and_the_training_run(checkpoint, tmp_path):
    ckpt = shutil.copytree(checkpoint, tmp_path / "run" / "checkpoint")  # changed below: a copy
    args = json.loads((ckpt / "training_args.json").read_text())
    training = {"ddp": "scratch", "world_size": 2, "epochs": 1, "lr": 1e-4, "batch_size": 16}
    (ckpt / "training_args.json").write_text(json.dumps({**args, **training, "seed": 42}))
    summary = {"ddp": "scratch", "world_size": 2, "steps": 125, "test_accuracy": 0.8917, "epoch_times_s": [1.0]}
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))  # experiments.train writes it there
    with TestClient(create_app(ckpt, ServerConfig(max_batch_size=4))) as c:
        info = c.get("/info").json()
    assert info["model"] == "tiny" and info["labels"] == list(LABELS) and info["max_length"] == 64
    assert info["checkpoint"] == str(ckpt) and info["limits"]["max_batch_size"] == 4
    assert info["training"] == training  # the options that made the model, and only those
    got = info["training_summary"]
    assert got["steps"] == 125 and got["test_accuracy"] == 0.8917 and "epoch_times_s" not in got
    # from torch's metadata, not an import: a CUDA wheel from PyPI says 2.10.0 there, 2.10.0+cu128 in __version__
    assert info["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]


@pytest.mark.parametrize("seconds", ["-1", "nan"])
def test_a_negative_shutdown_timeout_is_a_usage_error(checkpoint, capsys, seconds):
    from server.__main__ import main

    assert main(["--checkpoint", str(checkpoint), "--shutdown-timeout", seconds]) == 2
    assert "--shutdown-timeout must be a number of seconds >= 0" in capsys.readouterr().err


def test_the_server_uses_only_what_its_image_installs(checkpoint):
    # deploy/Dockerfile installs torch and deploy/requirements-server.txt and copies server/ and
    # distrinews/ (the shared error types), nothing else: a real load and prediction must need no more.
    code = f"""
import sys, time
from starlette.testclient import TestClient
import server.__main__
from server import create_app
with TestClient(create_app({str(checkpoint)!r})) as c:
    while c.get("/ready").status_code != 200:
        time.sleep(0.05)
    assert c.post("/predict", json={{"text": "Oil prices fell"}}).status_code == 200
print(" ".join(sorted(sys.modules)))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    modules = set(r.stdout.split())
    assert not {m for m in modules if m.split(".")[0] in ("experiments", "ddp_from_scratch", "ddp_native")}
    assert {m for m in modules if m.split(".")[0] == "distrinews"} == {"distrinews", "distrinews.errors"}
    assert not {m.split(".")[0] for m in modules} & {"datasets", "pandas", "pyarrow", "matplotlib"}


@pytest.mark.parametrize("requirements", ["requirements-server.txt", "requirements-onnx.txt"])
def test_the_image_requirements_are_the_package_ranges(requirements):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["onnx"]
    lines = (ROOT / "deploy" / requirements).read_text().splitlines()
    reqs = [line for line in lines if line.strip() and not line.startswith("#")]
    assert reqs and set(reqs) <= set(deps), set(reqs) - set(deps)  # same ranges as pyproject.toml


def test_trusted_proxies_are_read_as_uvicorn_reads_forwarded_allow_ips():
    # the addresses exempt from --max-connections-per-client (server/protocol.py): uvicorn's own setting
    from server.protocol import trusted_proxies

    trusted = trusted_proxies("127.0.0.1, ::1, 10.0.0.0/8, /tmp/proxy.sock")
    assert trusted("127.0.0.1") and trusted("::1") and trusted("10.2.3.4") and trusted("/tmp/proxy.sock")
    assert not trusted("127.0.0.2") and not trusted("11.0.0.1") and not trusted("::2")
    assert trusted_proxies("*")("8.8.8.8") and trusted_proxies(["*"])("::2")
    assert not trusted_proxies("")("127.0.0.1")  # FORWARDED_ALLOW_IPS= : no proxy trusted, every address bounded
