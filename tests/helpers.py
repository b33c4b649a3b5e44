"""Test helpers: deadlines instead of sleeps, record factories, a `tpx serve` process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypedDict, cast

import psycopg
import redis
from psycopg import sql
from redis.typing import KeyT, StreamIdT

NOW_MS = int(time.time() * 1000)


def wait_for(
    cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition", every: float = 0.05
) -> Any:
    """Poll ``cond`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")


def record(device: str = "356307042441013", ts: Any = None, **fields: Any) -> dict[str, str]:
    """A valid stream entry; keyword arguments override record keys (None removes one)."""
    rec: dict[str, Any] = {
        "ts": NOW_MS - 3_600_000 if ts is None else ts,
        "lat": 54.6872,
        "lon": 25.2797,
        "alt": 112.0,
        "angle": 90.0,
        "speed": 42.5,
        "satellites": 9,
        "priority": 0,
        "event_io_id": 0,
        "io": {
            "1": 1,
            "66": 12850,
            "16": {"__bigint__": "18446744073709551615"},
            "78": {"__bytes__": "AQID"},
        },
    }
    for key, value in fields.items():
        if value is None:
            rec.pop(key, None)
        else:
            rec[key] = value
    return {"device_id": device, "record": json.dumps(rec), "codec": "8E", "received_at": str(NOW_MS)}


def add_entries(client: redis.Redis, stream: str, entries: Iterable[dict[str, str]]) -> list[bytes]:
    pipe = client.pipeline(transaction=False)
    for fields in entries:
        pipe.xadd(stream, fields)  # type: ignore[arg-type]
    return pipe.execute()


# redis-py types each stream reply for every client setting at once (text or bytes, RESP2 or
# RESP3, entries deleted while pending); the tests' clients are bytes clients on RESP2, so these
# helpers say once what their replies are.

#: A stream entry as a bytes client reads it: (id, {field: value}).
Entry = tuple[bytes, dict[bytes, bytes]]


class Pending(TypedDict):
    """One XPENDING row, as redis-py names its fields."""

    message_id: bytes
    consumer: bytes
    time_since_delivered: int
    times_delivered: int


def xrange(client: redis.Redis, key: str, start: bytes | str = "-", end: bytes | str = "+") -> list[Entry]:
    """XRANGE ``key`` from ``start`` to ``end``, oldest first."""
    return cast(list[Entry], client.xrange(key, start, end))


def xrevrange(client: redis.Redis, key: str, count: int | None = None) -> list[Entry]:
    """The newest ``count`` entries of ``key``, newest first."""
    return cast(list[Entry], client.xrevrange(key, count=count))


def xreadgroup(
    client: redis.Redis, group: str, consumer: str, streams: dict[KeyT, StreamIdT], count: int | None = None
) -> list[tuple[bytes, list[Entry]]]:
    """XREADGROUP as ``consumer``: (stream key, entries) for each stream that had some."""
    reply = cast(list[list[Any]], client.xreadgroup(group, consumer, streams, count=count))
    return [(key, entries) for key, entries in reply]


def xpending_range(
    client: redis.Redis, stream: str, group: str, count: int, consumer: str | None = None
) -> list[Pending]:
    """The first ``count`` pending entries of ``group`` (of ``consumer`` only, if given)."""
    rows = client.xpending_range(stream, group, "-", "+", count, consumername=consumer)
    return cast(list[Pending], rows)


def rows(dsn: str, schema: str, columns: str = "device_id, ts") -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        query = sql.SQL("SELECT {} FROM {}.positions ORDER BY device_id, ts").format(
            sql.SQL(columns), sql.Identifier(schema)
        )
        return conn.execute(query).fetchall()


def row_count(dsn: str, schema: str) -> int:
    with psycopg.connect(dsn) as conn:
        query = sql.SQL("SELECT count(*) FROM {}.positions").format(sql.Identifier(schema))
        row = conn.execute(query).fetchone()
        assert row is not None
        return int(row[0])


def drained(client: redis.Redis, settings: Any, rows_expected: int) -> bool:
    """Exactly ``rows_expected`` rows in positions and nothing pending in the group."""
    return (
        row_count(settings.database_url, settings.db_schema) == rows_expected
        and pending_count(client, settings.stream, settings.group) == 0
    )


def pending_count(client: redis.Redis, stream: str, group: str = "processor") -> int:
    info = client.xpending(stream, group)
    return int(info["pending"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """A real `tpx serve` (or ``command``: `tpx domain`) subprocess with its own env; logs go to a
    file."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str, command: str = "serve") -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.args = args
        self.command = command
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = int(env["TPX_HTTP_ADDR"].rsplit(":", 1)[1]) if "TPX_HTTP_ADDR" in env else None

    def start(self) -> Serve:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tpx", self.command, *self.args],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def get(self, path: str) -> tuple[int, str]:
        import urllib.error
        import urllib.request

        assert self.port is not None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""


def redis_major(client: redis.Redis) -> int:
    """The server's major version, compared as a number ("10.0" > "7.0", unlike the strings)."""
    return int(str(client.info("server")["redis_version"]).split(".", 1)[0])
