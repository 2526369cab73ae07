"""A small HTTP server for /metrics and health endpoints, safe to leave on a shared host.

Each connection is read with a timeout (a client that connects and sends nothing is dropped after
`read_timeout` seconds), and at most `max_connections` are served at once: more are closed at
once, so idle or slow clients cannot grow the process by a thread each.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Page = tuple[int, bytes, str]  # status, body, content type
Route = Callable[[], Page]


class BoundedHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, max_connections: int) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve_http(
    address: str,
    routes: dict[str, Route],
    *,
    max_connections: int = 16,
    read_timeout: float = 5.0,
    name: str = "http",
) -> BoundedHTTPServer:
    """Serve `routes` (path -> page) on "host:port" from a daemon thread; 404 elsewhere.

    Raises OSError when the address cannot be bound."""
    host, _, port = address.rpartition(":")
    paths = ", ".join(sorted(routes))

    class Handler(BaseHTTPRequestHandler):
        timeout = read_timeout  # applied to the connection's socket by StreamRequestHandler

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            route = routes.get(self.path)
            if route is None:
                code, body, kind = 404, f"not found: try {paths}\n".encode(), "text/plain"
            else:
                code, body, kind = route()
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = BoundedHTTPServer(
        (host.strip("[]") or "127.0.0.1", int(port)), Handler, max_connections
    )
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server
