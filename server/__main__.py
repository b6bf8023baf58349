"""Run the inference server with uvicorn.

    python -m server --checkpoint runs/compare/scratch/checkpoint [--host 127.0.0.1] [--port 8000]
    python -m server --checkpoint ckpt --max-batch-texts 32 --max-wait-ms 2 --max-concurrent-requests 128

The limits' options come from server/config.py (`ServerConfig`); see server/app.py for the endpoints.
Exit statuses follow distrinews/errors.py: 0 after a graceful shutdown, 2 for a missing or invalid
checkpoint or an option out of range (a one-line message, no traceback), 3 if the model cannot be
loaded, 1 if the batcher dies of a bug (or uvicorn fails, e.g. a port already taken).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import uvicorn

from distrinews.errors import EXIT_OK, exit_code, guard
from server.app import create_app
from server.config import ServerConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server", description="Serve an AG News classifier over HTTP.")
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint directory (<experiments.train --output-dir>/checkpoint)"
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")), help="default: $PORT or 8000")
    ServerConfig.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and serve until SIGTERM or Ctrl-C (then finish the requests in flight);
    returns the exit status (the module docstring's), a project error said in one line by `guard`."""
    args = build_parser().parse_args(argv)
    return guard(lambda: serve(args))


def serve(args: argparse.Namespace) -> int:
    """Serve `args.checkpoint` until a signal or a fatal model error; the exit status it ends with.

    Raises UsageError (bad options or checkpoint) before anything listens.
    """
    server: uvicorn.Server | None = None

    def on_fatal() -> None:  # the model did not load: stop instead of serving 503s forever
        if server is not None:
            server.should_exit = True

    config = ServerConfig.from_args(args)
    app = create_app(args.checkpoint, config, on_fatal=on_fatal)
    uv = uvicorn.Config(app, host=args.host, port=args.port, lifespan="on", **config.uvicorn_options())
    server = uvicorn.Server(uv)
    # uvicorn handles SIGTERM and Ctrl-C itself (stop accepting, finish what was accepted, run the
    # lifespan's shutdown), then re-raises the signal to the handler it found. With these no-op
    # handlers a graceful shutdown ends with exit status 0, as orchestrators expect, not -15.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    error = app.state.serving.error
    return exit_code(error) if error is not None else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
