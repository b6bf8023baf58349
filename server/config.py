"""The server's limits: one frozen type holding each with its default, its help text and its check.

`python -m server` builds its command line from these fields (`ServerConfig.add_arguments`), and
`create_app` takes a `ServerConfig`, so each limit is written once, here.

How slow and idle clients are kept from holding the service (the last six fields):

- a prediction takes one of `max_concurrent_requests` admission slots only once its body has
  arrived and been checked (routes.py), so an upload that stalls holds a connection, never a slot;
- a body that has not arrived `body_timeout_s` seconds after its headers gets a 408 and its
  connection is closed (validation.py): 10 s by default, so a 1 MB body (`max_body_bytes`) still
  arrives over a 1 Mbit/s link, while a stalled upload is gone within seconds;
- an idle keep-alive connection is closed after `keep_alive_s` seconds without a new request
  (uvicorn's `timeout_keep_alive`): 5 s, uvicorn's default, longer than the pause between a
  browser's requests on one page and short enough that idle sockets do not pile up;
- at most `max_connections` connections (and running requests) at once (uvicorn's
  `limit_concurrency`): beyond, uvicorn answers 503 itself. 512 by default: twice the admission
  slots, so with every slot taken there is still room for /health, /ready and the 503s that say
  "at the limit", while the process's file descriptors and memory stay bounded.

- a request's line and headers must arrive within `header_timeout_s` seconds of the moment the
  connection waits for them (its opening, or the end of the previous response), else 408 and the
  connection is closed: uvicorn has no such deadline, server/protocol.py adds it. 10 s: a head is
  at most 16 KB (h11's limit), seconds even over a slow phone link, while a "slowloris" client
  that sends a header byte every few seconds is gone after 10;
- one client address holds at most `max_connections_per_client` open connections (the next gets a
  429, closed at once), so one address cannot fill `max_connections` even by reconnecting as fast
  as the head deadline closes it. 32: a browser opens at most 6 per host. Addresses of trusted
  proxies (uvicorn's `FORWARDED_ALLOW_IPS`, default 127.0.0.1) are not bounded: behind a proxy
  every client has the proxy's address, and the proxy limits them (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

from distrinews.errors import UsageError

from .predictor import BACKENDS


class ConfigError(UsageError, ValueError):
    """A limit out of its range (exit 2). `name` is the field, or the command-line flag."""

    def __init__(self, name: str, requirement: str, value):
        self.name, self.requirement, self.value = name, requirement, value
        super().__init__(f"{name} {requirement}, got {value!r}")

    def named(self, name: str) -> ConfigError:
        """The same error, naming `name` (a flag such as --shutdown-timeout) instead of the field."""
        return ConfigError(name, self.requirement, self.value)


def _option(default, help: str, flag: str | None = None, request_limit: bool = False, choices: tuple = ()):
    """A field with its command-line help; `flag` overrides the one derived from the name; a text
    field with `choices` takes only those (or None, its default)."""
    return field(
        default=default, metadata={"help": help, "flag": flag, "request_limit": request_limit, "choices": choices}
    )


@dataclass(frozen=True)
class ServerConfig:
    """Every limit of the server, with its default. Raises ConfigError (a ValueError) when one is
    out of range: the counts must be integers >= 1, the times finite numbers >= 0 (an infinite
    `max_wait_ms` would keep a lone request waiting forever)."""

    max_text_chars: int = _option(10_000, "characters per text; longer texts get a 422", request_limit=True)
    max_batch_size: int = _option(64, "texts per /predict/batch request; more get a 422", request_limit=True)
    max_body_bytes: int = _option(1_000_000, "bytes per request body; more get a 413", request_limit=True)
    max_length: int | None = _option(
        None, "tokens kept per text (default: the checkpoint's training max_length, else 128)", request_limit=True
    )
    max_batch_texts: int = _option(64, "texts per forward pass, as TEI's max batch requests", request_limit=True)
    max_batch_tokens: int = _option(
        8192, "padded tokens per forward pass, texts x longest, as TEI's max batch tokens", request_limit=True
    )
    max_wait_ms: float = _option(
        0.0,
        "milliseconds a request waits for others to share its forward pass (0: only while the model is busy)",
    )
    max_concurrent_requests: int = _option(
        256, "predictions in flight at most; beyond, an immediate 503 with Retry-After", request_limit=True
    )
    batching: bool = _option(True, "one forward pass per request (for comparison)", flag="--no-batching")
    backend: str | None = _option(
        None,
        "what runs the model: onnx (onnxruntime, the exported model) or torch (the safetensors weights); "
        "default: onnx when the checkpoint has --onnx-model and onnxruntime is installed, else torch",
        choices=tuple(BACKENDS),
    )
    onnx_model: str = _option(
        "onnx/model_quantized.onnx",
        "the ONNX model the onnx backend runs, relative to the checkpoint (python -m experiments.export writes "
        "onnx/model_quantized.onnx, int8, and onnx/model.onnx, float32)",
    )
    threads: int | None = _option(
        None, "threads of one forward pass (default: the backend's, one per core; 1 on a fraction of a CPU)"
    )
    body_timeout_s: float = _option(
        10.0, "seconds for a request body to arrive after its headers; then 408, connection closed", "--body-timeout"
    )
    keep_alive_s: float = _option(5.0, "seconds an idle keep-alive connection stays open", "--keep-alive-timeout")
    max_connections: int = _option(512, "open connections at most; beyond, uvicorn answers 503")
    header_timeout_s: float = _option(
        10.0,
        "seconds for a request's line and headers to arrive (from the connection's opening or the previous "
        "response); then 408, connection closed",
        "--header-timeout",
    )
    max_connections_per_client: int = _option(
        32,
        "open connections per client address at most, trusted proxies (FORWARDED_ALLOW_IPS) excepted; "
        "beyond, 429 and closed",
    )
    shutdown_timeout_s: float = _option(30.0, "seconds to finish accepted requests after SIGTERM", "--shutdown-timeout")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                if not isinstance(value, bool):
                    raise ConfigError(f.name, "must be True or False", value)
            elif f.type == "float":
                ok = not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value < math.inf
                if not ok:  # NaN too; an infinite wait or timeout would keep a client waiting forever
                    what = "a number of seconds >= 0 (finite)" if f.name.endswith("_s") else "a finite number >= 0"
                    raise ConfigError(f.name, f"must be {what}", value)
            elif f.type in ("str", "str | None"):
                if f.metadata["choices"] and value not in (*f.metadata["choices"], None):
                    raise ConfigError(f.name, f"must be one of {', '.join(f.metadata['choices'])}", value)
                if value is None and f.type == "str" or value is not None and not isinstance(value, str):
                    raise ConfigError(f.name, "must be a text", value)
            elif value is not None or f.type != "int | None":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f.name, "must be a positive integer", value)

    def request_limits(self) -> dict[str, int | None]:
        """The limits on one request and one forward pass, as /health and /info report them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["request_limit"]}

    def uvicorn_options(self) -> dict[str, float | int | type]:
        """The connection limits, as `uvicorn.Config` keyword arguments (`http`: the protocol class
        that enforces the head deadline and the per-client bound, server/protocol.py)."""
        from .protocol import guarded_protocol  # uvicorn's protocol: only the launcher needs it

        return {
            "http": guarded_protocol(self.header_timeout_s, self.max_connections_per_client),
            "timeout_keep_alive": self.keep_alive_s,
            "limit_concurrency": self.max_connections,
            "timeout_graceful_shutdown": self.shutdown_timeout_s,
        }

    # ---- the command line -------------------------------------------------------
    @staticmethod
    def flag(f: dataclasses.Field) -> str:
        return f.metadata["flag"] or "--" + f.name.replace("_", "-")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One option per field: its flag, type, default and help."""
        for f in dataclasses.fields(cls):
            help = f.metadata["help"]
            if f.type == "bool":  # on by default: the flag turns it off
                parser.add_argument(cls.flag(f), dest=f.name, action="store_false", help=help)
                continue
            if f.type in ("str", "str | None"):
                default = f" (default {f.default})" if f.default is not None else ""
                choices = f.metadata["choices"] or None
                parser.add_argument(cls.flag(f), dest=f.name, default=f.default, choices=choices, help=help + default)
                continue
            kind = float if f.type == "float" else int
            metavar = "N" if kind is int else "SECONDS" if f.name.endswith("_s") else "MS"
            if f.default is not None:
                help = f"{help} (default {f.default:g})" if kind is float else f"{help} (default {f.default})"
            parser.add_argument(cls.flag(f), dest=f.name, type=kind, default=f.default, metavar=metavar, help=help)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        """The config from parsed options. Raises ConfigError naming the flag that is out of range."""
        try:
            return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
        except ConfigError as e:
            raise e.named(cls.flag(next(f for f in dataclasses.fields(cls) if f.name == e.name))) from None
