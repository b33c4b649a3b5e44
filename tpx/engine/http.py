"""The metrics and health listener: ``/metrics``, ``/healthz``, ``/readyz``, ``/devices/<id>``.

A small threaded ``http.server`` in a named daemon thread; each request asks
the engine for a fresh answer (nothing is cached between scrapes).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, dict[str, Any]]]


class HealthServer:
    def __init__(
        self,
        bind: tuple[str, int],
        registry: CollectorRegistry,
        alive: Check,
        ready: Check,
        device: Callable[[str], dict[str, Any] | None] | None = None,
    ) -> None:
        routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry)),
            "/healthz": lambda: _json(*alive()),
            "/readyz": lambda: _json(*ready()),
        }

        def device_route(path: str) -> tuple[int, str, bytes] | None:
            if device is None or not path.startswith("/devices/"):
                return None
            state = device(unquote(path.removeprefix("/devices/")))
            if state is None:
                return 404, "application/json", b'{"error": "device not cached"}\n'
            return 200, "application/json", json.dumps(state).encode() + b"\n"

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                route = routes.get(path)
                try:
                    answer = route() if route is not None else device_route(path)
                except Exception as exc:  # a probe must answer, whatever broke
                    log.exception("http endpoint %s failed", path)
                    answer = (500, "text/plain", f"{type(exc).__name__}\n".encode())
                status, ctype, body = answer or (404, "text/plain", b"not found\n")
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http: " + format, *args)

        self.server = ThreadingHTTPServer(bind, Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="tpx-http", daemon=True)

    @property
    def address(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout)


def _json(ok: bool, detail: dict[str, Any]) -> tuple[int, str, bytes]:
    body = json.dumps({"ok": ok, **detail}, default=str).encode() + b"\n"
    return (200 if ok else 503), "application/json", body
