"""The static Space (deploy/static/, `python -m deploy.prepare space`): the page classifies in a real
browser (headless Chromium) as the Python server does, on the same exported int8 model.

One module fixture pays for the expensive part once: the tiny served checkpoint (conftest.py's, a
random model whose texts get different answers) exported with `python -m experiments.export`, and
the Space built from it by the route's own command, which runs `npm ci` of deploy/static's pinned
packages into .cache/static-space (reused while package-lock.json is unchanged; about 10 s the
first time on this machine). Skipped, never failed, where node and npm are absent; the browser
test also needs Debian's chromium and chromium-driver (.ci/run installs them).

The tiny model stands in for a trained one: the page's code path (tokenizer.json, truncation, the
int8 graph under onnxruntime-web, softmax) is the same for any BERT-family export, and the tiny
model's random weights at std 0.4 give the texts labels and probabilities far apart, so an answer
computed on other token ids would show. docs/deploy.md measures the page with the trained
minilm-l6.
"""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import threading
from pathlib import Path

import httpx
import pytest
from support import forkserver
from support.served_model import Server

from experiments.data import load_ag_news

NODE = shutil.which("node") and shutil.which("npm")
BROWSER = shutil.which("chromium") and shutil.which("chromedriver")
# slow: the export (torch's exporter, ~40 s here on a busy machine) and the page's two runs (~30 s)
pytestmark = [
    pytest.mark.skipif(not NODE, reason="needs node and npm (Node.js 20) to install the page's packages"),
    pytest.mark.slow,
]
TEXTS = 50  # test-split texts compared between the page and the server
# Float32: the page and the server run the same graph on the same token ids; only the kernels differ
# (onnxruntime's x86 build against its WebAssembly build), so the float32 sums round in another
# order: a relative 1e-6 or so on each logit (n eps with n in the hundreds, eps = 6e-8), and
# probabilities move at most half as much as logits (softmax's Jacobian). 1e-3 leaves room for
# that and none for another tokenization, truncation or label order (one token more or less moves
# the tiny model's probabilities by more than 1e-2). Measured: 4.5e-6.
TOLERANCE = 1e-3


def ok(r) -> None:
    assert r.returncode == 0, (r.stdout or "")[-3000:] + (r.stderr or "")[-3000:]


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported (`python -m experiments.export --no-check`): the folder that both
    the Space's route and the server's onnx backend read."""
    out = tmp_path_factory.mktemp("export") / "model"
    ok(forkserver.python(["-m", "experiments.export", str(checkpoint), "--out", str(out), "--no-check"]))
    return out


@pytest.fixture(scope="module")
def space(exported, tmp_path_factory) -> Path:
    """The Space folder built by the route's command from the export."""
    out = tmp_path_factory.mktemp("space") / "space"
    ok(forkserver.python(["-m", "deploy.prepare", "space", str(exported), "--out", str(out)]))
    return out


def test_the_space_folder_is_complete(space):
    from deploy.prepare import missing_space_files

    assert missing_space_files(space) == []
    readme = (space / "README.md").read_text()
    assert readme.startswith("---\n") and "\nsdk: static\n" in readme and "\napp_file: index.html\n" in readme
    assert "*.onnx filter=lfs" in (space / ".gitattributes").read_text()
    info = json.loads((space / "model" / "distrinews.json").read_text())
    assert info["max_length"] == 64 and info["download_bytes"] == sum(
        (space / "model" / n).stat().st_size for n in info["bytes"]
    )
    # the check can fail: a folder without a vendored file is incomplete
    (space / "vendor" / "ort.wasm.min.mjs").rename(space / "moved")
    try:
        assert missing_space_files(space) == ["vendor/ort.wasm.min.mjs"]
    finally:
        (space / "moved").rename(space / "vendor" / "ort.wasm.min.mjs")
    # nothing from another site: every script and module the page loads is a file of the folder
    loaded = re.findall(r'<script[^>]* src="([^"]+)"', (space / "index.html").read_text())
    loaded += re.findall(r'^import .* from "([^"]+)";', (space / "app.js").read_text(), re.M)
    assert sorted(loaded) == ["./vendor/ort.wasm.min.mjs", "./vendor/tokenizers.min.mjs", "app.js"], loaded
    assert all((space / path).is_file() for path in loaded)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript"}
    extensions_map[".wasm"] = "application/wasm"

    def log_message(self, *args):
        pass


@pytest.fixture
def static_host(space):
    """The Space served as a static site (what a static Space is): python's http.server in a thread."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(space)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def chromium(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chrome'}",
    ):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def point_the_page_at(space: Path, onnx: str) -> None:
    """Make the Space's page load model/`onnx` (model/distrinews.json names the file it fetches)."""
    f = space / "model" / "distrinews.json"
    info = json.loads(f.read_text())
    info["onnx"], info["bytes"][onnx] = onnx, (space / "model" / onnx).stat().st_size
    f.write_text(json.dumps(info))


def served(exported: Path, tmp_path: Path, onnx: str, texts: list[str]) -> list[dict]:
    """The Python server's answers on `onnx`, one request at a time: batches of one, as the page runs
    each text (int8 activations are quantized with one scale for the whole padded batch)."""
    with Server(exported, tmp_path, "--backend", "onnx", "--onnx-model", onnx) as srv:
        return [httpx.post(f"{srv.url}/predict", json={"text": t}, timeout=30).json() for t in texts]


def in_the_page(driver, texts: list[str]) -> list[dict]:
    """window.distrinews.classify on each text, one after the other, as a visitor's clicks."""
    page = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "(async () => { await window.distrinews.ready; const out = [];"
        "  for (const t of arguments[0]) out.push(await window.distrinews.classify(t)); return out; })()"
        ".then(done, (e) => done(String(e)));",
        texts,
    )
    assert isinstance(page, list), page
    return page


def largest_difference(page: list[dict], server: list[dict]) -> float:
    return max(
        abs(p["probabilities"][k] - s["probabilities"][k]) for p, s in zip(page, server) for k in s["probabilities"]
    )


@pytest.mark.skipif(not BROWSER, reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_the_page_classifies_as_the_server_does(exported, space, static_host, ag_news, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # every one over max_length (64) tokens of the tiny model's character-level tokenizer: truncated by both
    texts = list(load_ag_news(str(ag_news), max_eval_samples=TEXTS)["test"]["text"])
    int8, fp32 = "onnx/model_quantized.onnx", "onnx/model.onnx"
    server = {onnx: served(exported, tmp_path, onnx, texts) for onnx in (int8, fp32)}
    shutil.copy2(exported / fp32, space / "model" / fp32)
    driver = chromium(tmp_path)
    try:
        driver.set_script_timeout(120)
        # the page as the Space ships it: the int8 model
        driver.get(static_host + "/")
        assert "classify news" in driver.title
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "Ready." in d.find_element(By.ID, "status").text)
        status = driver.find_element(By.ID, "status").text
        assert "MB downloaded" in status and "64 tokens" in status, status  # the download size, the truncation
        driver.find_elements(By.CSS_SELECTOR, "button.ex")[1].click()  # an example fills and classifies
        wait.until(lambda d: d.find_element(By.ID, "label").text != "")
        timings = driver.execute_script("return window.distrinews.timings")
        page = {int8: in_the_page(driver, texts)}
        driver.find_element(By.ID, "text").clear()
        driver.find_element(By.ID, "go").click()  # empty text: said, as the server says it
        wait.until(lambda d: "empty" in d.find_element(By.ID, "error").text)
        # the same page on the float32 model: the server's answers to float rounding
        point_the_page_at(space, fp32)
        driver.get(static_host + "/")
        page[fp32] = in_the_page(driver, texts)
    finally:
        point_the_page_at(space, int8)
        driver.quit()
    assert [p["label"] for p in page[fp32]] == [s["label"] for s in server[fp32]]
    assert len({p["label"] for p in page[fp32]}) > 1  # the texts are told apart: a constant answer fails here
    assert largest_difference(page[fp32], server[fp32]) <= TOLERANCE, largest_difference(page[fp32], server[fp32])
    # int8: both quantize each activation on the fly with a scale from its float32 range, so a float
    # rounding that differs moves a value to the neighbouring int8 step, and the x86 kernels of a CPU
    # without VNNI (this one: AVX2) may saturate 16-bit sums that WebAssembly computes exactly. The
    # answers then differ by up to the int8 model's own error, never by more: bounded here by how far
    # the server's int8 answers are from its float32 ones on the same texts (labels: where the server's
    # two most probable classes are further apart than that).
    budget = largest_difference(server[int8], server[fp32])
    assert largest_difference(page[int8], server[int8]) <= budget, (
        largest_difference(page[int8], server[int8]),
        budget,
    )
    for p, s in zip(page[int8], server[int8]):
        top, second = sorted(s["probabilities"].values())[-2:][::-1]
        if top - second > 2 * budget:
            assert p["label"] == s["label"], (p, s)
    within = sum(largest_difference([p], [s]) <= TOLERANCE for p, s in zip(page[int8], server[int8]))
    print(
        f"page: model loaded {timings['loaded_ms']:.0f} ms, first prediction {timings['first_prediction_ms']:.0f} ms "
        f"after navigation; largest probability difference from the server: float32 "
        f"{largest_difference(page[fp32], server[fp32]):.1e}, int8 {largest_difference(page[int8], server[int8]):.1e} "
        f"({within}/{len(texts)} texts within {TOLERANCE:g}; the int8 model's own error here {budget:.1e})"
    )
