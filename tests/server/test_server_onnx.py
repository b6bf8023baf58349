"""The ONNX route: `python -m experiments.export` and the server's `--backend onnx`, on the tiny checkpoint.

The export is checked against torch (fp32: the same predictions; int8: the command's own check),
the ONNX backend against the torch backend on the same texts, its imports (neither torch nor
transformers: the torch-free image, deploy/Dockerfile.onnx, holds neither), and the refusals.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import pytest
from starlette.testclient import TestClient
from support import forkserver
from support.paths import AG_NEWS, ROOT, needs_ag_news

from experiments.model import LABELS
from server import ServerConfig, create_app

pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install -e '.[onnx]'")
pytest.importorskip("onnxscript", reason="needs the onnx extra: pip install -e '.[onnx]'")

# How far the float32 ONNX model's probabilities may be from torch's. Both compute the same float32
# operations in another order (onnxruntime fuses and reorders the sums), so each logit differs by
# rounding only: a dot product of length K has a relative error of at most K * eps (eps = 2**-24,
# float32's unit roundoff); the tiny model's longest sums have K = 64 (its FFN width), two layers
# and the head compound it to a few hundred eps relative on logits of magnitude ~10 (weights at
# std 0.4), i.e. ~1e-4 absolute at worst, and a softmax moves a probability by at most half the
# largest logit change. Measured: ~1e-6 (the command prints it). A bug (a dropped attention mask,
# swapped inputs) moves probabilities by 1e-2 or more (served_model.py: the texts differ by > 0.01).
FP32_PROB_TOLERANCE = 1e-4


def _texts() -> list[str]:
    """The first 64 AG News test texts (title and description), or the server's examples without the data."""
    if not AG_NEWS.exists():
        from server.pages import EXAMPLES

        return EXAMPLES
    with open(AG_NEWS / "test.csv", newline="", encoding="utf-8") as f:
        return [f"{title} {desc}" for _, (_, title, desc) in zip(range(64), csv.reader(f))]


TEXTS = _texts()


@pytest.fixture(scope="module")
def export_run(checkpoint, tmp_path_factory):
    """`python -m experiments.export` on the tiny checkpoint, once for this file (most of its time is
    torch's exporter), into a folder of its own: the layout the static page and the torch-free image
    read (no model.safetensors). Checked on the first 500 test texts, or not without the data."""
    out = tmp_path_factory.mktemp("exported") / "model"
    # 256 tokens, not the training's 64: the tiny tokenizer makes a token per character, so at 64 every
    # test text is truncated to the same length and no batch has padding, where a lost attention mask shows
    checked = ["--data-dir", str(AG_NEWS), "--max-eval-samples", "500", "--max-length", "256"]
    data = checked if AG_NEWS.exists() else ["--no-check"]
    r = forkserver.python(["-m", "experiments.export", str(checkpoint), "--out", str(out), *data])
    assert r.returncode in (0, 1), r.stderr[-3000:]  # 1: a check failed; which one is asserted below
    return out, r


@pytest.fixture(scope="module")
def exported(export_run):
    return export_run[0]


@needs_ag_news
def test_export_command_checks_parity_on_the_test_split(export_run):
    out, r = export_run
    for name in ("onnx/model.onnx", "onnx/model_quantized.onnx", "config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists()  # the weights stay in the checkpoint
    parity = json.loads((out / "onnx" / "parity.json").read_text())
    assert parity["n"] == 500 and parity["max_length"] == 256
    assert parity["fp32_equal_predictions"] == 500 and parity["fp32_ok"]
    assert parity["fp32_max_prob_diff"] <= FP32_PROB_TOLERANCE
    assert "largest probability difference" in r.stdout and "one standard error" in r.stdout
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr  # the exporter's notes are hidden
    # the int8 check is the command's own: its exit status says whether it held, on the arithmetic here
    se = (parity["accuracy_torch"] * (1 - parity["accuracy_torch"]) / 500) ** 0.5
    assert parity["standard_error"] == pytest.approx(se)
    assert parity["int8_ok"] == (abs(parity["accuracy_onnx_int8"] - parity["accuracy_torch"]) <= se)
    assert r.returncode == (0 if parity["int8_ok"] else 1)
    assert ("train longer" in r.stdout) == (not parity["int8_ok"])  # a failed check says what to do


def test_exported_model_has_the_agreed_interface(exported):
    import onnxruntime as ort

    for name in ("model.onnx", "model_quantized.onnx"):
        s = ort.InferenceSession(str(exported / "onnx" / name), providers=["CPUExecutionProvider"])
        inputs = {i.name: (i.type, i.shape) for i in s.get_inputs()}
        assert list(inputs) == ["input_ids", "attention_mask"], inputs
        for kind, shape in inputs.values():
            assert kind == "tensor(int64)" and len(shape) == 2 and all(isinstance(d, str) for d in shape), shape
        (out,) = s.get_outputs()
        assert out.name == "logits" and out.type == "tensor(float)" and len(out.shape) == 2


def answers(app_checkpoint, **config) -> tuple[list[dict], dict]:
    """The server's answers for TEXTS (one /predict/batch) and its /info, on `app_checkpoint` with `config`."""
    with TestClient(create_app(app_checkpoint, ServerConfig(max_batch_size=64, **config))) as c:
        while c.get("/ready").status_code != 200:
            pass
        batch = c.post("/predict/batch", json={"texts": TEXTS}).json()["predictions"]  # one forward pass
        info = c.get("/info").json()
    return batch, info


def test_onnx_backend_answers_as_the_torch_backend(checkpoint, exported):
    torch_answers, torch_info = answers(checkpoint, backend="torch")
    fp32, info = answers(exported, backend="onnx", onnx_model="onnx/model.onnx")
    assert torch_info["backend"]["name"] == "torch" and info["backend"]["name"] == "onnx"
    assert info["backend"]["model"] == "onnx/model.onnx" and "onnxruntime" in info["versions"]
    assert "torch" not in info["versions"] and "transformers" not in info["versions"]
    assert len({a["label"] for a in torch_answers}) > 1  # the texts get different labels: a mix-up would show
    for t, o in zip(torch_answers, fp32):
        assert o["label"] == t["label"]
        for name in LABELS:
            assert abs(o["probabilities"][name] - t["probabilities"][name]) <= FP32_PROB_TOLERANCE
    # int8: the default (onnx, since the folder has onnx/model_quantized.onnx). Quantization changes
    # labels (on this random model, whose logits are large, about 1 text in 10: the export's check
    # measures that on the test split), so it is compared with the same int8 model run directly on
    # the same batch (dynamic quantization scales activations by the batch's largest value, so a
    # text's answer depends on its batch-mates): what the server adds must change nothing.
    from experiments.export import onnx_runner, probabilities
    from server.tokenizer import TextTokenizer

    int8, info = answers(exported)
    assert info["backend"]["name"] == "onnx" and info["backend"]["model"] == "onnx/model_quantized.onnx"
    tok = TextTokenizer(exported, info["max_length"])
    direct = probabilities(onnx_runner(exported / "onnx" / "model_quantized.onnx"), tok(TEXTS), tok.pad_id, len(TEXTS))
    for o, p in zip(int8, direct):
        assert [o["probabilities"][name] for name in LABELS] == pytest.approx(p.tolist(), abs=1e-5)


def test_tokenizers_alone_give_the_ids_transformers_gives(checkpoint):
    from transformers import AutoTokenizer

    from server.tokenizer import TextTokenizer

    for max_length in (16, 64):
        ours = TextTokenizer(checkpoint, max_length)(TEXTS)
        theirs = AutoTokenizer.from_pretrained(checkpoint)(TEXTS, truncation=True, max_length=max_length)
        assert ours == theirs["input_ids"]
        assert max(len(x) for x in ours) == max_length  # some texts were truncated


def test_onnx_route_imports_neither_torch_nor_transformers(exported):
    # a fresh interpreter (not a fork of the test process, which has torch): what the torch-free
    # image (deploy/Dockerfile.onnx) runs, from loading the app to a prediction
    code = f"""
import sys, time
from starlette.testclient import TestClient
import server.__main__
from server import create_app
with TestClient(create_app({str(exported)!r})) as c:
    while c.get("/ready").status_code != 200:
        time.sleep(0.05)
    assert c.post("/predict", json={{"text": "Oil prices fell"}}).status_code == 200
    assert c.get("/info").json()["backend"]["name"] == "onnx"
print(" ".join(sorted(sys.modules)))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    top = {m.split(".")[0] for m in r.stdout.split()}
    assert "onnxruntime" in top and "tokenizers" in top
    assert not top & {"torch", "transformers", "datasets", "pandas", "pyarrow", "matplotlib"}, top


@pytest.mark.parametrize(
    "breaks,words",
    [
        (lambda d: (d / "config.json").unlink(), "has no config.json"),
        (lambda d: (d / "tokenizer.json").unlink(), "has no tokenizer.json"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), "could not load the weights"),
    ],
    ids=["no-config", "no-tokenizer", "broken-weights"],
)
def test_export_refuses_a_bad_checkpoint_with_a_clear_message(checkpoint, tmp_path, breaks, words):
    bad = shutil.copytree(checkpoint, tmp_path / "bad")
    breaks(bad)
    r = forkserver.python(["-m", "experiments.export", str(bad), "--no-check"])
    assert r.returncode in (2, 3) and words in r.stderr, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and not (bad / "onnx" / "model.onnx").exists()


def test_onnx_backend_without_an_export_is_refused(checkpoint):
    from server.checkpoint import CheckpointInvalid

    with pytest.raises(CheckpointInvalid, match="python -m experiments.export"):
        create_app(checkpoint, ServerConfig(backend="onnx"))


@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (apt-get install wrk; .ci/run installs it)")
@pytest.mark.slow  # two servers, a 3 s warm-up and 1 s of wrk each, 1 s of model batches each: about 30 s
def test_the_backend_comparison_measures_each_backend_it_names(checkpoint, exported, tmp_path):
    both = shutil.copytree(checkpoint, tmp_path / "both")  # torch's weights and, beside them, the export
    shutil.copytree(exported / "onnx", both / "onnx")
    args = ["--checkpoint", str(both), "--backends", "torch,onnx", "--rounds", "1", "--duration", "1"]
    r = forkserver.python(["-m", "experiments.bench.serving", *args, "--out", str(tmp_path / "out")], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "backends.json").read_text())
    torch_run, onnx_run = result["runs"]
    # each server ran the backend it was started for (the folder holds both: the default would be onnx)
    assert (torch_run["backend"], torch_run["served"]) == ("torch", "torch")
    assert (onnx_run["backend"], onnx_run["served"]) == ("onnx", "onnx onnx/model_quantized.onnx")
    for run in result["runs"]:
        assert run["rps"] > 0 and run["errors"] == 0 and run["model_batch32_texts_per_s"] > 0, run
    (ratio,) = result["ratios"]  # onnx over torch, within the round
    assert ratio["server_rps"] == pytest.approx(onnx_run["rps"] / torch_run["rps"])
    assert ratio["model"] == pytest.approx(
        onnx_run["model_batch32_texts_per_s"] / torch_run["model_batch32_texts_per_s"]
    )
    assert "| 0 | onnx (onnx onnx/model_quantized.onnx) |" in (tmp_path / "out" / "backends.md").read_text()
