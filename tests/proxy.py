"""A TCP proxy that a test can cut and restore, to simulate network and server outages.

In the spirit of psycopg's ``tests/fix_proxy.py``: tpx talks to the proxy, the
proxy to the real server (over TCP or a Unix socket). ``cut()`` drops every
open connection and refuses new ones (the client sees resets, like a server
restart or a partition); ``restore()`` accepts again.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

from psycopg.conninfo import conninfo_to_dict, make_conninfo

Target = str | tuple[str, int]


class Proxy:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self._up = threading.Event()
        self._up.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept_loop, name="test-proxy", daemon=True)
        self._thread.start()

    def _connect_target(self) -> socket.socket:
        if isinstance(self.target, str):
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.connect(self.target)
        return upstream

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._up.is_set():
                _reset(client)
                continue
            try:
                upstream = self._connect_target()
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._pairs.append((client, upstream))
                self.accepted += 1
            threading.Thread(
                target=self._pump, args=(client, upstream), name="test-proxy-pump", daemon=True
            ).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 0.2)
                if not self._up.is_set() or self._closed.is_set():
                    break
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except (OSError, ValueError):  # ValueError: select() on a socket cut() just closed
            pass
        finally:
            _reset(a)
            _reset(b)
            with self._lock:
                if (a, b) in self._pairs:
                    self._pairs.remove((a, b))

    def cut(self) -> None:
        """Drop every open connection and refuse new ones."""
        self._up.clear()
        with self._lock:
            pairs = list(self._pairs)
        for a, b in pairs:
            _reset(a)
            _reset(b)

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self.listener.close()
        self._thread.join(2)


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def postgres_target(dsn: str) -> Target:
    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or "127.0.0.1").split(",")[0]
    port = int(str(params.get("port") or 5432).split(",")[0])
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}"
    return (host, port)


def postgres_via(dsn: str, proxy: Proxy) -> str:
    params = conninfo_to_dict(dsn)
    params.pop("hostaddr", None)
    params.update(host="127.0.0.1", port=str(proxy.port))
    return make_conninfo("", **params)


def redis_target(url: str) -> Target:
    if url.startswith("unix://"):
        return url.removeprefix("unix://").split("?", 1)[0]
    from redis.connection import parse_url

    params = parse_url(url)  # type: ignore[no-untyped-call]  # redis-py leaves parse_url unannotated
    return (params.get("host", "127.0.0.1"), int(params.get("port", 6379)))


def redis_via(url: str, proxy: Proxy) -> str:
    if url.startswith("unix://"):
        db = "0"
        if "?db=" in url:
            db = url.split("?db=", 1)[1]
        return f"redis://127.0.0.1:{proxy.port}/{db}"
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{proxy.port}" if userinfo else f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))
