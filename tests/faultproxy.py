"""A recording HTTP proxy on 127.0.0.1 in front of a real server, answering faults on demand.

The one stand-in the MLflow tests use: it forwards every request to the real server and
records what a server does not show (the ``Authorization`` header of each request), and
it answers what a real server gives only by chance (a 503, a 429, a 400, a lost reply)
for as many requests as a test asks.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

__all__ = ["FaultProxy", "Seen"]

# Headers of one connection, not of the message (RFC 9110, 7.6.1); Host is the upstream's.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


_ERROR_CODES = {
    400: "INVALID_PARAMETER_VALUE",
    429: "REQUEST_LIMIT_EXCEEDED",
    503: "TEMPORARILY_UNAVAILABLE",
}


@dataclass(frozen=True)
class Seen:
    """One request as the proxy received it."""

    method: str
    path: str  # with its query
    authorization: str | None
    #: The status the client got: the server's, or the fault the proxy answered.
    status: int


@dataclass
class _Fault:
    status: int
    count: int
    forward: bool  # send the request to the server anyway: only its reply is lost


class FaultProxy:
    """Forwards to ``upstream`` (``http://host:port``); ``fail()`` injects answers.

    ``with FaultProxy(server.url) as proxy:`` listens on a free loopback port;
    ``proxy.url`` is what a client talks to.
    """

    def __init__(self, upstream: str, *, upstream_timeout: float = 60.0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self._upstream = (parts.hostname, parts.port)
        self._upstream_timeout = upstream_timeout
        self._lock = threading.Lock()
        self._seen: list[Seen] = []
        self._faults: list[_Fault] = []
        self._rejected: list[tuple[bytes, int]] = []  # (marker, status)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        port: int = self._server.server_address[1]
        return port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # Control -------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fault-proxy", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def fail(self, status: int, count: int = 1, *, forward: bool = False) -> None:
        """Answer the next ``count`` requests with ``status``, after those queued before.

        ``forward=True`` sends each to the server first: the server acts on it, the
        client sees only the fault (a reply lost on the way back).
        """
        with self._lock:
            self._faults.append(_Fault(status, count, forward))

    def reject(self, marker: bytes, status: int = 400) -> None:
        """Answer ``status`` to every request whose body contains ``marker``, without
        forwarding it: a server that refuses one particular value, every time."""
        with self._lock:
            self._rejected.append((marker, status))

    def clear(self) -> None:
        """No more faults, and forget the requests seen so far."""
        with self._lock:
            self._faults.clear()
            self._rejected.clear()
            self._seen.clear()

    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    @contextmanager
    def failing(self, status: int, count: int = 1, *, forward: bool = False) -> Iterator[None]:
        """``fail()`` for the block; whatever fault is left over is dropped at its end."""
        self.fail(status, count, forward=forward)
        try:
            yield
        finally:
            with self._lock:
                self._faults.clear()

    # Serving -------------------------------------------------------------------------
    def _next_fault(self, body: bytes) -> _Fault | None:
        with self._lock:
            for marker, status in self._rejected:
                if marker in body:
                    return _Fault(status, 1, forward=False)
            if not self._faults:
                return None
            fault = self._faults[0]
            fault.count -= 1
            if fault.count <= 0:
                self._faults.pop(0)
            return fault

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self._seen.append(seen)

    def _forward(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*self._upstream, timeout=self._upstream_timeout)
        try:
            connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            connection.putheader("Host", f"{self._upstream[0]}:{self._upstream[1]}")
            for name, value in headers:
                connection.putheader(name, value)
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as MLflow's requests session uses

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet: tests read ``proxy.seen``

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks: list[bytes] = []
                    while True:
                        size = int(self.rfile.readline().split(b";", 1)[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", "0")))

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in _HOP_BY_HOP:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._next_fault(body)
                headers = [
                    (name, value)
                    for name, value in self.headers.items()
                    if name.lower() not in _HOP_BY_HOP
                ]
                if fault is None or fault.forward:
                    try:
                        status, answer, content = proxy._forward(
                            self.command, self.path, headers, body
                        )
                    except OSError as error:  # the server is down or stopped
                        status, answer = 502, [("Content-Type", "text/plain")]
                        content = f"fault proxy: upstream failed: {error}".encode()
                if fault is not None:
                    status, answer = fault.status, [("Content-Type", "application/json")]
                    # The body MLflow's server sends with such a status; the message says
                    # who really answered.
                    code = _ERROR_CODES.get(status, "INTERNAL_ERROR" if status >= 500 else "")
                    content = json.dumps(
                        {"error_code": code or "BAD_REQUEST", "message": "fault proxy"}
                    ).encode()
                proxy._record(
                    Seen(self.command, self.path, self.headers.get("Authorization"), status)
                )
                self._reply(status, answer, content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        return Handler
