"""Is the Hugging Face hub within reach? Ask once, in seconds, before a library retries for a minute.

Without internet, `datasets.load_dataset` and `from_pretrained` retry with back-off before they
give up (28-50 s measured here for one call). `unreachable_reason` opens one TCP connection to the
hub's host first (`HF_ENDPOINT`, default https://huggingface.co) with a short timeout, so an
offline run fails in seconds with a message that says what to do instead.

It stays out of the way when it cannot judge: with `HF_HUB_OFFLINE=1` (the libraries then use
their local cache and never connect) and behind a proxy (`HTTPS_PROXY`), the libraries decide.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

TIMEOUT_S = 5.0  # DNS lookup and TCP connect together, roughly: enough for a slow link


def unreachable_reason(timeout_s: float = TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached (a short text), or None if it can, or if we should not judge."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return None
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as e:  # socket.gaierror (no DNS), timeout, connection refused
        return f"cannot connect to {host}:{port} ({type(e).__name__}: {e})"
