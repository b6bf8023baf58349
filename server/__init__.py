"""HTTP inference server for DistriNews checkpoints: `python -m server --checkpoint DIR`.

Where things are, in the order a request meets them:

    __main__.py     python -m server: the command line (built from config.py), uvicorn, exit codes
    config.py       ServerConfig: every limit with its default, help text and check
    protocol.py     uvicorn's HTTP/1.1 protocol with a deadline on request heads and a bound per client address
    app.py          create_app: the wiring (checkpoint, config, state, routes, metrics)
    checkpoint.py   Checkpoint: the served directory's config, labels and training run (no weights)
    state.py        ServingState: status, counters, model load, admission, classify
    routes.py       the endpoints, one handler each, reading the state from `request.app.state.serving`
    validation.py   what a request must be (400/408/413/422)
    tokenizer.py    TextTokenizer: texts -> token ids, from tokenizer.json (the `tokenizers` library alone)
    predictor.py    Predictor: token ids -> predictions; the backends (onnx, torch); tests pass a fake
    batcher.py      dynamic batching: concurrent requests in one forward pass
    metrics.py      Prometheus metrics and the middleware that counts requests
    pages.py        the page at / and the Swagger UI page at /docs

Its load generator lives with the benchmarks (python -m experiments.bench.serving): the service
imports nothing of training, only the shared error types (distrinews/errors.py).
"""

from server.app import create_app
from server.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
