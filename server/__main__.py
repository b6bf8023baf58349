"""Run the inference server with uvicorn.

    python -m server --checkpoint runs/compare/scratch/checkpoint [--host 127.0.0.1] [--port 8000]

See server/app.py for the endpoints and their limits.
"""

from __future__ import annotations

import argparse

import uvicorn

from server.app import MAX_BATCH_SIZE, MAX_BODY_BYTES, MAX_TEXT_CHARS, create_app


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve until interrupted.

    Exits with status 2 and a one-line message (no traceback) if the checkpoint is
    missing or invalid, and with uvicorn's status 3 if the model fails to load at startup.
    """
    p = argparse.ArgumentParser(prog="python -m server", description="Serve an AG News classifier over HTTP.")
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint directory (<experiments.train --output-dir>/checkpoint)"
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE, help="texts per /predict/batch")
    p.add_argument("--max-text-chars", type=int, default=MAX_TEXT_CHARS, help="characters per text")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="bytes per request body")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens kept per text (default: the checkpoint's training max_length, else 128)",
    )
    args = p.parse_args(argv)
    try:
        app = create_app(
            args.checkpoint,
            max_text_chars=args.max_text_chars,
            max_batch_size=args.max_batch_size,
            max_body_bytes=args.max_body_bytes,
            max_length=args.max_length,
        )
    except (FileNotFoundError, ValueError) as e:
        p.exit(2, f"error: {e}\n")
    # lifespan="on": a model that fails to load stops the server instead of serving 500s.
    uvicorn.run(app, host=args.host, port=args.port, lifespan="on")


if __name__ == "__main__":
    main()
