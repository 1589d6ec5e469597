"""A reverse proxy on 127.0.0.1 that injects faults into GETs of objects: throttling, resets mid-body, latency."""

from __future__ import annotations

import collections
import hashlib
import http.client
import http.server
import socket
import struct
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

# A fault for a GET: "503" (S3's SlowDown), "429", "reset" (headers and half the body, then a TCP reset), "stall"
# (nothing until the proxy's ``release`` event is set, then the object), or None (forwarded as it is).
Fault = Callable[[str, int], "str | None"]

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
TOO_MANY = b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>TooManyRequests</Code><Message>slow</Message></Error>'
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


def share_of_gets(kind: str, share: float, seed: int = 0) -> Fault:
    """A fault plan giving ``kind`` to ``share`` of GETs, decided by a seeded hash of the object's path and its
    try number, so that each object's tries fail the same way whatever order the requests come in."""

    def fault(path: str, attempt: int) -> str | None:
        digest = hashlib.blake2b(f"{seed}:{path}:{attempt}".encode(), digest_size=8).digest()
        return kind if int.from_bytes(digest, "big") / 2**64 < share else None

    return fault


def every_try(kind: str, names: set[str]) -> Fault:
    """A fault plan giving ``kind`` to every GET of the objects whose path ends in one of ``names``."""
    return lambda path, attempt: kind if path.rsplit("/", 1)[-1] in names else None


def first_try(kind: str) -> Fault:
    """A fault plan giving ``kind`` to the first GET of every object."""
    return lambda path, attempt: kind if attempt == 1 else None


class FaultProxy:
    """A threaded HTTP/1.1 reverse proxy to ``upstream`` (moto's S3 server, an HTTP image server) on a free port.

    Every request is forwarded, ``latency_s`` later. A GET of an image (no query, a file name with a dot: not a
    listing) may instead get the fault that ``fault(path, try number of that path)`` returns. ``retry_after``
    (the header's text) goes with 503 and 429 answers when given. ``gets`` counts the image GETs per path,
    ``faults`` the faults given by kind, ``times`` the monotonic time of each path's GETs.
    """

    def __init__(self, upstream: str, fault: Fault | None = None, latency_s: float = 0.0, retry_after: str = ""):
        self.upstream = urlsplit(upstream)
        self.fault = fault or (lambda path, attempt: None)
        self.latency_s = latency_s
        self.retry_after = retry_after
        self.gets: collections.Counter[str] = collections.Counter()
        self.faults: collections.Counter[str] = collections.Counter()
        self.times: dict[str, list[float]] = collections.defaultdict(list)
        self.release = threading.Event()
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                proxy.handle(self)

            do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        """Forwards one request, or answers it with its fault."""
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        if self.latency_s:
            time.sleep(self.latency_s)
        path, _, query = request.path.partition("?")
        kind = None
        if request.command == "GET" and not query and "." in path.rsplit("/", 1)[-1]:  # an image, not a listing
            with self.lock:
                self.gets[path] += 1
                self.times[path].append(time.monotonic())
                kind = self.fault(path, self.gets[path])
                if kind:
                    self.faults[kind] += 1
        if kind in ("503", "429"):
            self._answer(request, int(kind), SLOW_DOWN if kind == "503" else TOO_MANY)
            return
        if kind == "stall":
            self.release.wait()
        status, headers, content = self._forward(request, body)
        request.send_response(status)
        for name, value in headers:
            if name.lower() not in HOP_HEADERS:
                request.send_header(name, value)
        request.send_header("Content-Length", str(len(content)))
        request.end_headers()
        if request.command == "HEAD":
            return
        if kind == "reset":
            request.wfile.write(content[: len(content) // 2])
            request.wfile.flush()
            # SO_LINGER 0: closing sends a TCP reset, as a load balancer dropping the connection does.
            request.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.close_connection = True
            return
        request.wfile.write(content)

    def _answer(self, request: http.server.BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        request.send_response(status)
        request.send_header("Content-Type", "application/xml")
        request.send_header("Content-Length", str(len(body)))
        if self.retry_after:
            request.send_header("Retry-After", self.retry_after)
        request.end_headers()
        request.wfile.write(body)

    def _forward(self, request: http.server.BaseHTTPRequestHandler, body: bytes):
        connection = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
            connection.request(request.command, request.path, body=body or None, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()
