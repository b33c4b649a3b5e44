"""The metrics and health listener: ``/metrics``, ``/healthz``, ``/readyz``, ``/devices/<id>``.

With ``TPX_HTTP_TOKEN`` set, ``/devices/*`` (live positions) answers 401 without
``Authorization: Bearer <token>`` (``/metrics`` too with ``TPX_HTTP_TOKEN_METRICS``); the probes
stay open. The token is compared in constant time and never logged.

A small threaded ``http.server`` in a named daemon thread; each request asks
the engine for a fresh answer (nothing is cached between scrapes). A client that
hangs up early (a probe that gave up) is one DEBUG line, any other failure of a
connection one WARNING line: never a traceback on stderr.
"""

from __future__ import annotations

import hmac
import json
import logging
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tpx.config import HttpAccess

log = logging.getLogger(__name__)

#: Seconds between the listener's checks for a stop request (the stdlib's 0.5 s would take
#: half of the shutdown tail).
POLL_INTERVAL_S = 0.05

Check = Callable[[], tuple[bool, dict[str, Any]]]


class HealthServer:
    def __init__(
        self,
        bind: tuple[str, int],
        registry: CollectorRegistry,
        alive: Check,
        ready: Check,
        device: Callable[[str], dict[str, Any] | None] | None = None,
        access: HttpAccess | None = None,
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

        def refused(path: str, authorization: str | None) -> bool:
            """Whether ``path`` needs the bearer token and the request lacks it."""
            if access is None or not (
                path.startswith("/devices/") or (path == "/metrics" and access.metrics)
            ):
                return False
            scheme, _, given = (authorization or "").partition(" ")
            return scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), access.token)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if refused(path, self.headers.get("Authorization")):
                    body = b'{"error": "this path needs Authorization: Bearer <TPX_HTTP_TOKEN>"}\n'
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Bearer realm="tpx"')
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
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

        self.server = _Server(bind, Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, args=(POLL_INTERVAL_S,), name="tpx-http", daemon=True
        )

    @property
    def address(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> threading.Thread:
        """Start stopping; the caller joins the returned thread with its own deadline."""

        def stop() -> None:
            self.server.shutdown()  # returns once serve_forever has seen the request
            self.server.server_close()

        stopper = threading.Thread(target=stop, name="tpx-http-stop", daemon=True)
        stopper.start()
        return stopper


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a request still being answered never holds up the exit

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One log line per failed connection, in place of the stdlib's traceback on stderr."""
        exc = sys.exc_info()[1]
        peer = client_address[0] if isinstance(client_address, tuple) else client_address
        if isinstance(exc, ConnectionError | TimeoutError):  # the client hung up or went silent
            log.debug("http: client %s went away: %s", peer, exc)
        else:
            log.warning("http: request from %s failed: %s: %s", peer, type(exc).__name__, exc)


def _json(ok: bool, detail: dict[str, Any]) -> tuple[int, str, bytes]:
    body = json.dumps({"ok": ok, **detail}, default=str).encode() + b"\n"
    return (200 if ok else 503), "application/json", body
