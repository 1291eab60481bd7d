"""A fault-injecting HTTP proxy for S3 tests: it sits on 127.0.0.1 in front of an S3
server (moto in these tests) and, per request, passes it through, answers it with an S3
error, or cuts an upload off halfway.

Every client connection carries one request: the proxy reads it in full (Content-Length
or chunked framing), answers `Expect: 100-continue` itself, forwards the request with
`Connection: close`, and relays the response with `Connection: close` too. botocore then
opens a new connection for its next request, so no response framing has to be parsed on
the way back and no half-used keep-alive connection is ever reused.

Faults are set at runtime and counted, so a test can assert that they happened:

    proxy.fail_next(3, 503)   # the next 3 requests get 503 SlowDown
    proxy.fail_next(1, 409, methods={"PUT"})  # the next PUT: ConditionalRequestConflict
    proxy.fail_all(500)       # every request gets 500 InternalError until reset
    proxy.fail_all(500, methods={"PUT"})  # only PUTs fail
    proxy.drop_puts(times=2)  # the next 2 PUTs with a body: half the body, then both
                              # connections are closed
    proxy.lose_responses(methods={"PUT"})  # the first such request to each path reaches
                              # the server whole; the client's connection closes before
                              # the answer
    proxy.reset()             # pass everything through
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

_ERRORS = {
    409: ("Conflict", "ConditionalRequestConflict",
          "A conflicting conditional operation is currently in progress against this "
          "resource. Please try again."),
    500: ("Internal Server Error", "InternalError",
          "We encountered an internal error. Please try again."),
    503: ("Slow Down", "SlowDown", "Please reduce your request rate."),
}
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"expect"}
_MAX_HEAD = 64 * 1024  # bytes of request line and headers
_TIMEOUT = 30  # seconds without progress on either socket before the proxy gives up


@dataclass(frozen=True)
class Seen:
    """One request the proxy handled and what it did with it."""

    method: str
    path: str
    declared_bytes: int  # the request's Content-Length (0 when chunked or bodiless)
    body_bytes: int  # of the request body that reached the server (or the error answer)
    outcome: str  # "passed", "409", "500", "503", "dropped" or "lost"
    status: int | None  # the status the client got; None when the connection was cut


class _Request:
    def __init__(self, rfile) -> None:
        line = rfile.readline(_MAX_HEAD)
        if not line:
            raise EOFError
        self.line = line
        self.method, self.target, _ = line.decode("latin-1").split(" ", 2)
        self.headers: list[tuple[bytes, bytes]] = []
        size = len(line)
        while True:
            raw = rfile.readline(_MAX_HEAD)
            size += len(raw)
            if size > _MAX_HEAD:
                raise ValueError("request head too large")
            if raw in (b"\r\n", b"\n", b""):
                break
            name, _, value = raw.partition(b":")
            self.headers.append((name.strip(), value.strip()))

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def head(self) -> bytes:
        """The request line and headers as forwarded: hop-by-hop ones replaced."""
        lines = [self.line]
        lines += [k + b": " + v + b"\r\n" for k, v in self.headers
                  if k.lower() not in _HOP_BY_HOP]
        lines.append(b"Connection: close\r\n\r\n")
        return b"".join(lines)


def _read_chunked(rfile) -> bytes:
    """The raw bytes of a chunked body, trailers included, exactly as sent."""
    out = bytearray()
    while True:
        size_line = rfile.readline(_MAX_HEAD)
        if not size_line:
            raise EOFError("chunked body ended early")
        out += size_line
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while True:  # trailers (aws-chunked puts its checksum here), then a blank line
                trailer = rfile.readline(_MAX_HEAD)
                out += trailer
                if trailer in (b"\r\n", b"\n", b""):
                    return bytes(out)
        out += rfile.read(size + 2)  # the chunk and its CRLF


class FaultProxy:
    """`url` forwards to `upstream` (http://host:port) with the faults set at runtime."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.counts: Counter[str] = Counter()
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._fail_left = 0
        self._fail_status = 503
        self._fail_forever = False
        self._fail_methods: frozenset[str] | None = None
        self._drop_left = 0
        self._drop_forever = False
        self._lose_methods: frozenset[str] = frozenset()
        self._lost: Counter[str] = Counter()  # path -> answers lost so far
        self._lose_per_path = 0

        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = _TIMEOUT

            def handle(self) -> None:
                proxy._handle(self.connection, self.rfile)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="s3-fault-proxy", daemon=True)
        self._thread.start()

    # -- faults --------------------------------------------------------------------

    def reset(self) -> None:
        """Pass every request through; the counts are kept."""
        with self._lock:
            self._fail_left = self._drop_left = self._lose_per_path = 0
            self._fail_forever = self._drop_forever = False
            self._fail_methods = None

    def fail_next(self, k: int, status: int = 503, methods: set[str] | None = None) -> None:
        """Answer the next `k` requests (with a method in `methods`, if given) with
        `status` (409 ConditionalRequestConflict, 500 InternalError, 503 SlowDown)."""
        self._set_failures(status, k, forever=False, methods=methods)

    def fail_all(self, status: int = 500, methods: set[str] | None = None) -> None:
        """Answer every request (or every one with a method in `methods`) with `status`
        until `reset`."""
        self._set_failures(status, 0, forever=True, methods=methods)

    def _set_failures(self, status: int, k: int, *, forever: bool,
                      methods: set[str] | None) -> None:
        if status not in _ERRORS:
            raise ValueError(f"status must be one of {sorted(_ERRORS)}, got {status}")
        with self._lock:
            self._fail_left, self._fail_status, self._fail_forever = k, status, forever
            self._fail_methods = frozenset(methods) if methods is not None else None

    def drop_puts(self, times: int | None = None) -> None:
        """Cut the next `times` PUTs that carry a body (all of them if None): forward half
        of the body, then close the client's and the server's connection."""
        with self._lock:
            self._drop_forever = times is None
            self._drop_left = times or 0

    def lose_responses(self, methods: set[str], per_path: int = 1) -> None:
        """Forward the first `per_path` requests to each path with a method in `methods`
        whole, then close the client's connection before it sees the answer: the server
        has acted on a request that its client thinks failed."""
        with self._lock:
            self._lose_methods, self._lose_per_path = frozenset(methods), per_path
            self._lost.clear()

    def clear(self) -> None:
        """Forget the counts and the requests seen so far."""
        with self._lock:
            self.counts.clear()
            self.seen.clear()

    def statuses(self, method: str, path_suffix: str) -> list[int | None]:
        """The statuses the client got for `method` requests whose path ends so."""
        with self._lock:
            return [s.status for s in self.seen
                    if s.method == method and s.path.endswith(path_suffix)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- one connection, one request -----------------------------------------------

    def _decide(self, request: _Request, has_body: bool) -> str:
        with self._lock:
            selected = self._fail_methods is None or request.method in self._fail_methods
            if selected and (self._fail_forever or self._fail_left > 0):
                self._fail_left = max(0, self._fail_left - 1)
                return str(self._fail_status)
            if request.method == "PUT" and has_body and (self._drop_forever
                                                        or self._drop_left > 0):
                self._drop_left = max(0, self._drop_left - 1)
                return "dropped"
            if (request.method in self._lose_methods
                    and self._lost[request.target] < self._lose_per_path):
                self._lost[request.target] += 1
                return "lost"
            return "passed"

    def _record(self, request: _Request, body_bytes: int, outcome: str,
                status: int | None) -> None:
        with self._lock:
            self.counts[outcome] += 1
            length = int(request.header(b"content-length") or 0)
            self.seen.append(Seen(request.method, request.target, length, body_bytes, outcome,
                                  status))

    def _handle(self, client: socket.socket, rfile) -> None:
        try:
            request = _Request(rfile)
        except (EOFError, ValueError, OSError):
            return
        length = int(request.header(b"content-length") or 0)
        chunked = b"chunked" in (request.header(b"transfer-encoding") or b"").lower()
        outcome = self._decide(request, has_body=chunked or length > 0)
        if (request.header(b"expect") or b"").lower() == b"100-continue":
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

        if outcome == "dropped":
            # Half the body reaches the server, then both connections go away mid-upload.
            body = rfile.read(length // 2) if not chunked else _read_chunked(rfile)
            body = body[: len(body) // 2] if chunked else body
            self._record(request, len(body), outcome, None)
            with socket.create_connection(self.upstream, timeout=_TIMEOUT) as upstream:
                upstream.sendall(request.head() + body)
            client.shutdown(socket.SHUT_RDWR)
            return

        body = _read_chunked(rfile) if chunked else rfile.read(length)
        if outcome.isdigit():  # an error status of _ERRORS
            self._record(request, len(body), outcome, int(outcome))
            client.sendall(self._error(request, int(outcome)))
            return
        with socket.create_connection(self.upstream, timeout=_TIMEOUT) as upstream:
            upstream.sendall(request.head() + body)
            response = bytearray()
            while chunk := upstream.recv(1 << 16):
                response += chunk
        if outcome == "lost":
            self._record(request, len(body), outcome, None)
            client.shutdown(socket.SHUT_RDWR)
            return
        # Recorded before the client sees the answer, so a test that has its answer sees
        # the record too.
        self._record(request, len(body), outcome, int(response.split(b" ", 2)[1]))
        client.sendall(self._close_after(bytes(response)))

    @staticmethod
    def _error(request: _Request, status: int) -> bytes:
        reason, code, message = _ERRORS[status]
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
               f"<Message>{message}</Message><Resource>{request.target}</Resource>"
               f"<RequestId>fault-proxy</RequestId></Error>").encode()
        body = b"" if request.method == "HEAD" else xml
        return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(xml)}\r\nConnection: close\r\n\r\n").encode() + body

    @staticmethod
    def _close_after(response: bytes) -> bytes:
        head, sep, body = response.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        kept = [lines[0]] + [line for line in lines[1:]
                             if line.split(b":", 1)[0].strip().lower() not in _HOP_BY_HOP]
        return b"\r\n".join([*kept, b"Connection: close"]) + sep + body
