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
pytestmark = pytest.mark.skipif(not NODE, reason="needs node and npm (Node.js 20) to install the page's packages")
TEXTS = 50  # test-split texts compared between the page and the server
# The page and the server run the same int8 graph on the same token ids; what differs is the
# kernels (onnxruntime's x86 MLAS against its WebAssembly build): the float32 parts (embeddings,
# LayerNorm, softmax, GELU, each activation's quantization scale) round in another order, a
# relative 1e-6 or so, and an activation that lands that close to a quantization step's edge
# rounds to the neighbouring int8 value. Probabilities move at most half as much as logits
# (softmax's Jacobian), so 1e-3 leaves room for a few such flips per text and none for a
# different tokenization or truncation (one token more or less moves them by more than 1e-2 here).
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
    # nothing from another site: every script and module the page loads is its own
    for page in ("index.html", "app.js"):
        text = (space / page).read_text()
        assert "http://" not in text.replace("https://github.com", "").replace("https://www.npmjs.com", "")
        assert "cdn" not in text.lower()


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


@pytest.mark.skipif(not BROWSER, reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_the_page_classifies_as_the_server_does(exported, space, static_host, ag_news, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # every one over max_length (64) tokens of the tiny model's character-level tokenizer: truncated by both
    texts = load_ag_news(str(ag_news), max_eval_samples=TEXTS)["test"]["text"]
    # the server on the same int8 model, one request at a time (a batch of one, as the page runs each text:
    # the int8 activations' scale is taken over the whole batch, so a padded batch would differ more)
    with Server(exported, tmp_path, "--backend", "onnx") as srv:
        served = [httpx.post(f"{srv.url}/predict", json={"text": t}, timeout=30).json() for t in texts]
    driver = chromium(tmp_path)
    try:
        driver.set_script_timeout(120)
        driver.get(static_host + "/")
        assert "classify news" in driver.title
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "Ready." in d.find_element(By.ID, "status").text)
        status = driver.find_element(By.ID, "status").text
        assert "MB downloaded" in status and "64 tokens" in status, status  # the download size, the truncation
        driver.find_elements(By.CSS_SELECTOR, "button.ex")[1].click()  # an example fills and classifies
        wait.until(lambda d: d.find_element(By.ID, "label").text != "")
        timings = driver.execute_script("return window.distrinews.timings")
        page = driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "(async () => { const out = [];"  # one after the other, as a visitor's clicks
            "  for (const t of arguments[0]) out.push(await window.distrinews.classify(t)); return out; })()"
            ".then(done, (e) => done(String(e)));",
            texts,
        )
        assert isinstance(page, list), page
        labels = [p["label"] for p in page]
        assert len(set(labels)) > 1  # the texts are told apart: a constant answer would pass below otherwise
        worst = 0.0
        for text, p, s in zip(texts, page, served):
            assert p["label"] == s["label"], (text[:80], p, s)
            worst = max(worst, *(abs(p["probabilities"][k] - s["probabilities"][k]) for k in s["probabilities"]))
        assert worst <= TOLERANCE, worst
        driver.find_element(By.ID, "text").clear()
        driver.find_element(By.ID, "go").click()  # empty text: said, as the server says it
        wait.until(lambda d: "empty" in d.find_element(By.ID, "error").text)
    finally:
        driver.quit()
    print(
        f"page: model loaded {timings['loaded_ms']:.0f} ms, first prediction {timings['first_prediction_ms']:.0f} ms "
        f"after navigation; largest probability difference from the server {worst:.2e}"
    )
