"""Socket-level fault injection in front of a real registry.

:class:`FaultProxy` is a loopback HTTP/1.1 server that forwards every request
to an upstream registry and relays the answer, except where a :class:`Rule`
matches: then it answers with a status of its own (429 with ``Retry-After``,
503), sends part of the body and stalls, closes cleanly (a truncated body),
resets the connection (a drop), rewrites a header, or replaces the body. Each
rule applies to a bounded number of matching requests, then the proxy
forwards again, so a test can script "fail twice, then work".

Every request is logged (method, path, ``Range``, ``Authorization``,
arrival time) so tests can check what the client did. A stalled handler
waits on an event that :meth:`FaultProxy.close` sets, so stopping the proxy
never waits on a client; the stall itself lasts until the client gives up.
"""

from __future__ import annotations

import http.client
import io
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

# Headers that describe one hop, not the message: never relayed.
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade"}


@dataclass
class Rule:
    """A fault for requests whose method and path match, ``times`` times
    (``None``: every time).

    ``action`` is one of ``status`` (answer ``status`` with ``headers`` and
    an empty JSON body), ``stall`` (send the headers and ``after_bytes`` of
    the body, then nothing), ``truncate`` (send ``after_bytes`` and close
    cleanly), ``drop`` (send ``after_bytes`` and reset the connection),
    ``headers`` (forward with ``headers`` replacing the upstream's),
    ``body`` (forward with ``body`` replacing the upstream's body, and
    ``headers`` applied) and ``redirect`` (answer 307 to ``location`` plus
    the last segment of the path, as registries send blobs to a store).
    """

    path: str
    action: str
    times: int | None = 1
    method: str = "GET"
    status: int = 503
    after_bytes: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    location: str = ""

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and re.search(self.path, path) is not None


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    range: str | None
    authorization: str | None
    arrived: float
    fault: str | None


class FaultProxy:
    """A forwarding proxy on ``127.0.0.1`` with scripted faults."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.rules: list[Rule] = []
        self.log: list[LoggedRequest] = []
        self.released = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(_ForwardingHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def take_rule(self, method: str, path: str) -> Rule | None:
        """The first rule matching, with one use spent."""
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, path) and rule.times != 0:
                    if rule.times is not None:
                        rule.times -= 1
                    return rule
        return None

    def record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self.log.append(entry)

    def requests_to(self, pattern: str) -> list[LoggedRequest]:
        with self._lock:
            return [entry for entry in self.log if re.search(pattern, entry.path)]

    def close(self) -> None:
        self.released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of ``HOST:PORT``, closed on exit."""
    host, _, port = upstream.rpartition(":")
    proxy = FaultProxy(host, int(port))
    try:
        yield proxy
    finally:
        proxy.close()


class _ForwardingHandler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the request log is kept in the proxy instead."""

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def _handle(self) -> None:
        rule = self.owner.take_rule(self.command, self.path)
        self.owner.record(
            LoggedRequest(
                self.command,
                self.path,
                self.headers.get("Range"),
                self.headers.get("Authorization"),
                time.monotonic(),
                rule.action if rule else None,
            )
        )
        if rule is not None and rule.action == "status":
            self._answer_status(rule)
            return
        if rule is not None and rule.action == "redirect":
            target = rule.location + self.path.rsplit("/", 1)[-1]
            self._send_head(
                307,
                "Temporary Redirect",
                [("Location", target), ("Content-Length", "0")],
            )
            return
        status, reason, headers, body_source = self._forward()
        if rule is not None and rule.action in ("headers", "body"):
            headers = _replace_headers(headers, rule.headers)
        if rule is not None and rule.action == "body" and rule.body is not None:
            body_source.close()
            body = rule.body
            headers = _replace_headers(headers, {"Content-Length": str(len(body))})
            self._send_head(status, reason, headers)
            self.wfile.write(body)
            return
        self._send_head(status, reason, headers)
        if self.command == "HEAD":
            body_source.close()
            return
        if rule is not None and rule.action in ("stall", "truncate", "drop"):
            self._misbehave(rule, body_source)
            return
        _copy_body(body_source, self.wfile)

    def _forward(
        self,
    ) -> tuple[int, str, list[tuple[str, str]], _BodySource]:
        connection = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        connection.putrequest(self.command, self.path, skip_host=True)
        connection.putheader(
            "Host", f"{self.owner.upstream[0]}:{self.owner.upstream[1]}"
        )
        # Repeated headers (Go sends one Accept per media type) stay repeated.
        for name, value in self.headers.items():
            if name.lower() not in HOP_BY_HOP and name.lower() != "host":
                connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        relayed = [
            (name, value)
            for name, value in response.getheaders()
            if name.lower() not in HOP_BY_HOP
        ]
        if response.getheader("Content-Length") is None and self.command != "HEAD":
            # Relay a chunked upstream body with a length, so the client can
            # tell a truncated body from a complete one.
            content = response.read()
            relayed.append(("Content-Length", str(len(content))))
            return response.status, response.reason, relayed, _Buffered(content)
        return response.status, response.reason, relayed, response

    def _send_head(
        self, status: int, reason: str, headers: list[tuple[str, str]]
    ) -> None:
        self.send_response_only(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()

    def _answer_status(self, rule: Rule) -> None:
        body = b'{"errors":[{"code":"UNAVAILABLE","message":"injected fault"}]}'
        headers = [("Content-Type", "application/json"), *rule.headers.items()]
        headers.append(("Content-Length", str(len(body))))
        self._send_head(rule.status, "Injected", headers)
        self.wfile.write(body)

    def _misbehave(self, rule: Rule, body: _BodySource) -> None:
        # ``after_bytes`` counts from the start of the resource, so a resumed
        # request (``Range: bytes=N-``) past it gets nothing: a persistent
        # fault cannot be outrun by resuming.
        start = 0
        requested = self.headers.get("Range", "")
        if requested.startswith("bytes="):
            start = int(requested.removeprefix("bytes=").split("-")[0] or 0)
        allowed = max(0, rule.after_bytes - start)
        sent = body.read(allowed) if allowed else b""
        self.wfile.write(sent)
        self.wfile.flush()
        body.close()
        if rule.action == "stall":
            # Hold the connection open, sending nothing, until the client
            # gives up (its idle timeout) or the proxy is closed.
            while not self.owner.released.wait(0.1):
                if _peer_closed(self.connection):
                    break
        elif rule.action == "drop":
            # SO_LINGER 0: close() sends a reset instead of a clean FIN.
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        self.close_connection = True


class _BodySource(Protocol):
    def read(self, amount: int, /) -> bytes: ...

    def close(self) -> None: ...


class _Buffered:
    def __init__(self, content: bytes) -> None:
        self._content = content
        self._position = 0

    def read(self, amount: int, /) -> bytes:
        end = self._position + amount
        chunk = self._content[self._position : end]
        self._position += len(chunk)
        return chunk

    def close(self) -> None:
        self._content = b""


def _copy_body(source: _BodySource, sink: io.BufferedIOBase) -> None:
    try:
        while chunk := source.read(1 << 16):
            sink.write(chunk)
    finally:
        source.close()


def _peer_closed(connection: socket.socket) -> bool:
    try:
        connection.setblocking(False)
        try:
            return connection.recv(1, socket.MSG_PEEK) == b""
        finally:
            connection.setblocking(True)
    except BlockingIOError:
        return False
    except OSError:
        return True


def _replace_headers(
    headers: list[tuple[str, str]], replacements: dict[str, str]
) -> list[tuple[str, str]]:
    lowered = {name.lower() for name in replacements}
    kept = [(name, value) for name, value in headers if name.lower() not in lowered]
    return kept + [(name, value) for name, value in replacements.items() if value]
