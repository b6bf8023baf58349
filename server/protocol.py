"""The server's HTTP/1.1 connections: uvicorn's h11 protocol with a deadline on each request's head
and a bound on the connections one client address holds (slow and greedy clients, a "slowloris").

Why a subclass: no uvicorn protocol (0.55: h11, httptools, zttp) times out a request's head.
`timeout_keep_alive` covers the idle time between requests only, and the first byte received
cancels it (`data_received` starts with `_unset_keepalive_if_required()`), so a client that
sends a request line and then one header byte every 2 s holds its connection for ever; a fresh
connection that sends nothing is never closed either. ASGI middleware cannot help: the app sees a
request only once its headers are complete. Other servers have the setting (hyper's
`header_read_timeout` under granian, Go's `ReadHeaderTimeout`, nginx's `client_header_timeout`),
but switching servers would change the shutdown, the 503 at `max_connections` and the options the
tests and docs rely on; a subclass of uvicorn's own protocol keeps all of that and adds ~60
lines. The same fix as xorbitsai/inference#5213 (a request deadline wrapped around uvicorn's
protocol), with hyper's rule for when the clock starts (hyperium/hyper#2675).

- **Head deadline** (`header_timeout_s`): the request line and headers must arrive within that
  many seconds of the moment the connection waits for them: its opening, or the end of the
  previous response on a kept-alive connection. Then a 408 (when part of a head arrived) or a
  plain close (nothing arrived), like nginx's `client_header_timeout`. One absolute deadline, not
  a timer per byte: a byte every 2 s does not reset it.
- **Per-client bound** (`max_connections_per_client`): one address may hold that many open
  connections; the next one gets a 429 and is closed at once, before it costs a request. Behind a
  reverse proxy every connection comes from the proxy, so addresses that uvicorn trusts as proxies
  (`--forwarded-allow-ips`, i.e. `FORWARDED_ALLOW_IPS`, default `127.0.0.1,::1`) are not bounded:
  their clients are the proxy's to limit (docs/deploy.md). The bound cannot follow
  `X-Forwarded-For`: a connection is counted when it opens, before any header arrives.
"""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from collections.abc import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def trusted_proxies(spec: str | list[str]) -> Callable[[str], bool]:
    """`is_trusted(host)` for uvicorn's `forwarded_allow_ips` ("*", or comma-separated addresses,
    networks such as 10.0.0.0/8, and literals), read as uvicorn's ProxyHeadersMiddleware reads it."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if "*" in items:
        return lambda host: True
    networks, literals = [], set()
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            literals.add(item)  # e.g. a unix socket path

    def is_trusted(host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host in literals
        return any(address in n for n in networks)

    return is_trusted


def _response(status: int, reason: str, error: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 response that closes the connection, with the server's JSON error body."""
    body = json.dumps({"error": error}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"{extra}connection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's H11Protocol with a head deadline and a per-client bound. Made by `guarded_protocol`,
    which sets the class attributes below; uvicorn makes one instance per connection."""

    header_timeout_s: float
    max_per_client: int
    open_by_client: Counter  # open connections per counted (untrusted) address, shared by the server's
    _is_trusted: Callable[[str], bool] | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline = None
        cls = type(self)
        if cls._is_trusted is None:  # uvicorn's config is known only now; parsed once per server
            cls._is_trusted = trusted_proxies(self.config.forwarded_allow_ips)
        host = self.client[0] if self.client else None
        self._counted = host if host is not None and not cls._is_trusted(host) else None
        if self._counted is not None:
            self.open_by_client[host] += 1
            if self.open_by_client[host] > self.max_per_client:
                why = (
                    f"{host} already holds {self.max_per_client} open connections, the most one address may; "
                    "reuse one (keep-alive) or close some"
                )
                self.transport.write(_response(429, "Too Many Requests", why, "retry-after: 1\r\n"))
                self.transport.close()
                return
        self._arm_head_deadline()

    def connection_lost(self, exc) -> None:
        self._cancel_head_deadline()
        if self._counted is not None:
            self.open_by_client[self._counted] -= 1
            if not self.open_by_client[self._counted]:
                del self.open_by_client[self._counted]
            self._counted = None
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request's head has arrived (or the connection failed)
            self._cancel_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:  # waiting for the next head
            self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # part of a head arrived: say why it is closed
            why = (
                f"the request line and headers did not arrive within {self.header_timeout_s:g} s; "
                "send the whole head at once"
            )
            self.transport.write(_response(408, "Request Timeout", why))
        self.transport.close()


def guarded_protocol(header_timeout_s: float, max_connections_per_client: int) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol class for one server (uvicorn.Config(http=...)): its own connection counts.

    Args:
        header_timeout_s: seconds for a request's line and headers to arrive, from the opening of the
            connection or the end of the previous response.
        max_connections_per_client: open connections one untrusted address may hold.
    """
    attrs = {
        "header_timeout_s": header_timeout_s,
        "max_per_client": max_connections_per_client,
        "open_by_client": Counter(),
    }
    return type("GuardedH11Protocol", (GuardedH11Protocol,), attrs)
