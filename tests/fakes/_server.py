"""The HTTP plumbing both fake providers share: a real server on 127.0.0.1, faults and call counters.

The fakes are real HTTP servers (not mocks) so the official SDKs run their whole stack against them:
URL building, query encoding, keep-alive connections, status-to-exception mapping. A subclass
implements `route` (and the provider's error JSON); this module owns everything that is not about
the provider: threads, the listening socket, `down()`/`up()`, injected faults and the request log.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

JSON = dict[str, Any]


@dataclass(frozen=True)
class Request:
    """One request as the fake received it; `query` keeps repeated keys and their order."""

    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes

    def param(self, name: str) -> str | None:
        """The last value of a query parameter, as most servers read a repeated one."""
        found = None
        for key, value in self.query:
            if key == name:
                found = value
        return found

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Response:
    """What a route answers: a status, a JSON-able body (or pre-encoded text) and extra headers."""

    status: int
    body: JSON | str
    headers: dict[str, str] = field(default_factory=dict)

    def encoded(self) -> bytes:
        text = self.body if isinstance(self.body, str) else json.dumps(self.body)
        return text.encode()


@dataclass(frozen=True)
class Call:
    """An entry of the request log: enough to assert which calls a job made, and what it was told."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    status: int | None  # None: the connection was reset without an answer


@dataclass
class _Fault:
    remaining: int
    status: int | None  # None: reset the connection
    retry_after: float | None
    path_prefix: str | None
    headers: dict[str, str]


class _Handler(BaseHTTPRequestHandler):
    """Hands every request to the owning fake; HTTP/1.1 so SDK connection pools keep connections alive."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall
    server: _Server

    def do_GET(self) -> None:
        self.server.fake._serve(self)

    def do_POST(self) -> None:
        self.server.fake._serve(self)

    def do_DELETE(self) -> None:
        self.server.fake._serve(self)

    def do_PATCH(self) -> None:
        self.server.fake._serve(self)

    def log_message(self, *args: Any) -> None:
        """Silence the per-request stderr line."""


class _Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer that remembers its open connections, so `down()` can cut them too."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], fake: FakeServer) -> None:
        self.fake = fake
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.connections_lock:
                self.connections.discard(request)

    def cut_connections(self) -> None:
        """Close every kept-alive connection, so a pooled client connection cannot outlive `down()`."""
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class FakeServer:
    """Base class of the fake providers: lifecycle, fault injection, call counters.

    Use as a context manager (`with StripeFake() as fake:`) or call `start()`/`stop()`. State lives
    on the fake, not on the socket, so `down()` then `up()` keeps every object and the same port.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._faults: list[_Fault] = []
        self._log: list[Call] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Self:
        """Listen on a free port of 127.0.0.1 (the same port again after a `stop()`)."""
        if self._server is None:
            self._server = _Server(("127.0.0.1", self._port), self)
            self._port = self._server.server_address[1]
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"{type(self).__name__}:{self._port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut open connections: the next request is refused."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.cut_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The base address to give the SDK, e.g. `http://127.0.0.1:54321` (no trailing slash)."""
        if not self._port:
            raise RuntimeError("start the fake first")
        return f"http://127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    def down(self) -> None:
        """The provider is unreachable: connections are refused until `up()` (state is kept)."""
        self.stop()

    def up(self) -> None:
        """Listen again on the same port after `down()`."""
        self.start()

    @property
    def is_down(self) -> bool:
        return self._server is None

    # -- fault injection -------------------------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        status: int = 429,
        retry_after: float | None = 1,
        *,
        path_prefix: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next `n` requests (to `path_prefix`, if given) with `status` and the provider's error JSON.

        A 429 carries `Retry-After: <retry_after>` unless `retry_after` is None; other statuses carry
        it only when asked with `headers`. Faults queue up: a second call applies after the first is used.
        """
        with self.lock:
            self._faults.append(
                _Fault(n, status, retry_after if status == 429 else None, path_prefix, dict(headers or {}))
            )

    def reset_next(self, n: int = 1, *, path_prefix: str | None = None) -> None:
        """Close the connection of the next `n` requests without answering (a reset mid-request)."""
        with self.lock:
            self._faults.append(_Fault(n, None, None, path_prefix, {}))

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    # -- counters --------------------------------------------------------------------------------

    @property
    def calls(self) -> int:
        """Requests received since the start (or the last `reset_calls()`), faults included."""
        with self.lock:
            return len(self._log)

    def calls_to(self, path_prefix: str, method: str | None = None) -> int:
        """Requests whose path starts with `path_prefix` (and of `method`, if given)."""
        with self.lock:
            return sum(
                1
                for call in self._log
                if call.path.startswith(path_prefix) and (method is None or call.method == method)
            )

    def calls_by_path(self) -> Counter[str]:
        """Request counts per exact path: the per-endpoint counter."""
        with self.lock:
            return Counter(call.path for call in self._log)

    @property
    def log(self) -> list[Call]:
        """A copy of the request log, oldest first."""
        with self.lock:
            return list(self._log)

    def reset_calls(self) -> None:
        with self.lock:
            self._log.clear()

    # -- for subclasses --------------------------------------------------------------------------

    def route(self, request: Request) -> Response:
        """Answer one request; called with `self.lock` held. Subclasses implement the provider's API."""
        raise NotImplementedError

    def error(self, status: int, message: str, *, code: str | None = None, param: str | None = None) -> Response:
        """The provider's error JSON for `status`."""
        raise NotImplementedError

    def authenticate(self, request: Request) -> Response | None:
        """None when the request may proceed, else the provider's 401."""
        return None

    # -- the request path ------------------------------------------------------------------------

    def _take_fault(self, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.path_prefix is None or path.startswith(fault.path_prefix):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _answer(self, request: Request) -> Response | None:
        with self.lock:
            fault = self._take_fault(request.path)
            if fault is not None and fault.status is None:
                self._log.append(Call(request.method, request.path, tuple(request.query), None))
                return None
            if fault is not None:
                assert fault.status is not None
                response = self.fault_response(fault.status)
                if fault.retry_after is not None:
                    response.headers["Retry-After"] = _number(fault.retry_after)
                response.headers.update(fault.headers)
            else:
                response = self.authenticate(request) or self._route_safely(request)
            self._log.append(Call(request.method, request.path, tuple(request.query), response.status))
            return response

    def fault_response(self, status: int) -> Response:
        """The provider's answer for an injected status; subclasses word 429 and 5xx as the provider does."""
        return self.error(status, f"Injected HTTP {status}")

    def _route_safely(self, request: Request) -> Response:
        try:
            return self.route(request)
        except _HTTPError as exc:
            return exc.response
        except Exception as exc:
            return self.error(500, f"fake server error: {type(exc).__name__}: {exc}")

    def _serve(self, handler: _Handler) -> None:
        parts = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        request = Request(
            method=handler.command,
            path=parts.path,
            query=parse_qsl(parts.query, keep_blank_values=True),
            headers={key.lower(): value for key, value in handler.headers.items()},
            body=body,
        )
        response = self._answer(request)
        if response is None:
            _reset(handler)
            return
        payload = response.encoded()
        handler.send_response(response.status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        for key, value in response.headers.items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(payload)


class _HTTPError(Exception):
    """Raised inside a route to answer an error at once (unknown id, bad parameter)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def abort(response: Response) -> _HTTPError:
    """`raise abort(self.error(404, ...))` from a route."""
    return _HTTPError(response)


def _reset(handler: _Handler) -> None:
    """Drop the connection with an RST (SO_LINGER 0), as a proxy or a crashed server would."""
    with contextlib.suppress(OSError):
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.close_connection = True


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


_TO_ALPHANUMERIC = str.maketrans({"-": "x", "_": "Z"})


def random_chars(rng: random.Random, length: int) -> str:
    """`length` random letters and digits, fast: seeding 50,000 objects makes 100,000 ids."""
    return base64.urlsafe_b64encode(rng.randbytes(length)).decode()[:length].translate(_TO_ALPHANUMERIC)
