"""How long the static Space's page takes from navigation to its first prediction, in headless Chromium.

    python -m deploy.measure_page runs/space [--runs 3]

Serves the folder that `make space` wrote with python's http.server on loopback (so the network is
not measured: add the model's download at the visitor's bandwidth, which the page shows), opens it
in a fresh headless Chromium each run (an empty cache: the model is fetched every time), classifies
one example, and prints the page's own clocks (window.distrinews.timings, milliseconds since
navigation): the model downloaded, the model and tokenizer loaded, the first prediction shown.
Needs Debian's chromium and chromium-driver, and selenium (the `dev` extra).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import sys
import tempfile
import threading
from pathlib import Path


class _Static(http.server.SimpleHTTPRequestHandler):
    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".mjs": "text/javascript",
        ".wasm": "application/wasm",
    }

    def log_message(self, *args):
        pass


def measure(space: Path, runs: int) -> list[dict]:
    """The page's timings (ms since navigation) for `runs` cold loads of `space`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Static, directory=str(space)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    out = []
    try:
        for _ in range(runs):
            with tempfile.TemporaryDirectory() as profile:
                opts = webdriver.ChromeOptions()
                opts.binary_location = shutil.which("chromium")
                for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
                    opts.add_argument(flag)
                opts.add_argument(f"--user-data-dir={profile}")
                driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
                try:
                    driver.get(f"http://127.0.0.1:{httpd.server_address[1]}/")
                    wait = WebDriverWait(driver, 300)
                    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "button.ex"))
                    driver.find_elements(By.CSS_SELECTOR, "button.ex")[0].click()
                    wait.until(lambda d: d.find_element(By.ID, "label").text != "")
                    out.append(driver.execute_script("return window.distrinews.timings"))
                finally:
                    driver.quit()
    finally:
        httpd.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.measure_page", description=__doc__.split("\n")[0])
    p.add_argument("space", type=Path, help="the folder `make space` wrote (default runs/space)")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    if not (args.space / "index.html").is_file():
        print(f"error: {args.space} has no index.html: build it with make space CHECKPOINT=...", file=sys.stderr)
        return 2
    for i, t in enumerate(measure(args.space, args.runs), 1):
        print(
            f"run {i}: model downloaded {t['downloaded_ms']:.0f} ms, loaded {t['loaded_ms']:.0f} ms, "
            f"first prediction {t['first_prediction_ms']:.0f} ms after navigation"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
