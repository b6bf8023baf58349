"""Run the inference server with uvicorn.

    python -m server --checkpoint runs/compare/scratch/checkpoint [--host 127.0.0.1] [--port 8000]
    python -m server --checkpoint ckpt --max-batch-texts 32 --max-wait-ms 2 --max-concurrent-requests 128

See server/app.py for the endpoints and their limits.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import uvicorn

from server.app import (
    MAX_BATCH_SIZE,
    MAX_BATCH_TEXTS,
    MAX_BATCH_TOKENS,
    MAX_BODY_BYTES,
    MAX_CONCURRENT_REQUESTS,
    MAX_TEXT_CHARS,
    MAX_WAIT_MS,
    create_app,
)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve until SIGTERM or Ctrl-C (then finish the requests in flight).

    Exits with status 2 and a one-line message (no traceback) if the checkpoint is missing or
    invalid, with status 3 if the model fails to load or the batcher dies, and with 0 after a graceful shutdown.
    """
    p = argparse.ArgumentParser(prog="python -m server", description="Serve an AG News classifier over HTTP.")
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint directory (<experiments.train --output-dir>/checkpoint)"
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")), help="default: $PORT or 8000")
    p.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE, help="texts per /predict/batch request")
    p.add_argument("--max-text-chars", type=int, default=MAX_TEXT_CHARS, help="characters per text")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="bytes per request body")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens kept per text (default: the checkpoint's training max_length, else 128)",
    )
    p.add_argument("--max-batch-texts", type=int, default=MAX_BATCH_TEXTS, help="texts per forward pass")
    p.add_argument("--max-batch-tokens", type=int, default=MAX_BATCH_TOKENS, help="padded tokens per forward pass")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=MAX_WAIT_MS,
        help="how long a request waits for others to share its forward pass (default 0: only while the model is busy)",
    )
    p.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=MAX_CONCURRENT_REQUESTS,
        help="predictions in flight at most; beyond, an immediate 503 with Retry-After",
    )
    p.add_argument("--no-batching", action="store_true", help="one forward pass per request (for comparison)")
    p.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="seconds to finish accepted requests after SIGTERM"
    )
    args = p.parse_args(argv)
    server: list[uvicorn.Server] = []
    failed = []

    def on_fatal() -> None:  # the model did not load: stop instead of serving 503s forever
        failed.append(True)
        if server:
            server[0].should_exit = True

    try:
        app = create_app(
            args.checkpoint,
            max_text_chars=args.max_text_chars,
            max_batch_size=args.max_batch_size,
            max_body_bytes=args.max_body_bytes,
            max_length=args.max_length,
            max_batch_texts=args.max_batch_texts,
            max_batch_tokens=args.max_batch_tokens,
            max_wait_ms=args.max_wait_ms,
            max_concurrent_requests=args.max_concurrent_requests,
            batching=not args.no_batching,
            on_fatal=on_fatal,
        )
    except (FileNotFoundError, ValueError) as e:
        p.exit(2, f"error: {e}\n")
    if not args.shutdown_timeout >= 0:  # also NaN
        p.exit(2, f"error: --shutdown-timeout must be a number of seconds >= 0, got {args.shutdown_timeout}\n")
    config = uvicorn.Config(
        app, host=args.host, port=args.port, lifespan="on", timeout_graceful_shutdown=args.shutdown_timeout
    )
    server.append(uvicorn.Server(config))
    # uvicorn handles SIGTERM and Ctrl-C itself (stop accepting, finish what was accepted, run the
    # lifespan's shutdown), then re-raises the signal to the handler it found. With these no-op
    # handlers a graceful shutdown ends with exit status 0, as orchestrators expect, not -15.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server[0].run()
    sys.exit(3 if failed else 0)


if __name__ == "__main__":
    main()
