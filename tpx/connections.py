"""Building connections from settings, in one place, lazily (only when a command needs them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg
import redis
from psycopg import sql

from tpx import logs
from tpx.config import Settings

if TYPE_CHECKING:  # the pool is imported where one is built: ops commands and the CLI never need it
    from psycopg_pool import ConnectionPool

#: Seconds a Redis socket may stay silent; longer than any BLOCK we issue.
REDIS_SOCKET_TIMEOUT_S = 15.0
REDIS_CONNECT_TIMEOUT_S = 5.0
#: Bytes read from a Redis socket at a time (redis-py's default: 32 KiB). One XREADGROUP page
#: (read_count 1000 x ~350 B) then arrives in one or two reads instead of ten or more, each of
#: which released and re-took the GIL: +8.5 % records/s in the pipeline benchmark (8 interleaved
#: pairs, 7 won), for a buffer of this size per pooled connection (a handful).
REDIS_SOCKET_READ_SIZE = 512 * 1024
#: Seconds to wait for a Postgres connection to be established.
PG_CONNECT_TIMEOUT_S = 5


def redis_client(settings: Settings) -> redis.Redis:
    """A thread-safe client (its own connection pool); replies stay bytes."""
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        health_check_interval=30,
        client_name=f"tpx:{settings.consumer}",
        socket_read_size=REDIS_SOCKET_READ_SIZE,
    )


def pg_connect(conninfo: str, purpose: str, **options: Any) -> psycopg.Connection[tuple[Any, ...]]:
    """One PostgreSQL connection with tpx's connect timeout, named for ``pg_stat_activity``.

    Every connection outside the writer pool goes through here, so none of them can hang on a
    server that does not answer; ``purpose`` becomes the ``application_name`` (``tpx-migrate``).
    """
    return psycopg.connect(
        conninfo, connect_timeout=PG_CONNECT_TIMEOUT_S, application_name=purpose[:63], **options
    )


def search_path(settings: Settings) -> sql.Composed:
    return sql.SQL("SET search_path TO {}, public").format(sql.Identifier(settings.db_schema))


def writer_timeouts(settings: Settings) -> list[sql.Composable]:
    """The writers' session settings: a lock or a statement never holds a batch forever."""
    return [
        sql.SQL("SET lock_timeout TO {}").format(sql.Literal(settings.writer_lock_timeout_ms)),
        sql.SQL("SET statement_timeout TO {}").format(sql.Literal(settings.writer_statement_timeout_ms)),
    ]


def pg_pool(settings: Settings, size: int, name: str, configure_sql: list[sql.Composable]) -> ConnectionPool:
    """A psycopg pool whose connections have tpx's search_path and the given setup.

    Each connection made tells :func:`tpx.logs.pool_connected`, which ends the pool's outage in
    the logs (psycopg_pool's own failure lines are collapsed there, one line per outage)."""
    from psycopg_pool import ConnectionPool

    statements = [search_path(settings), *configure_sql]

    def configure(conn):  # type: ignore[no-untyped-def]
        for statement in statements:
            conn.execute(statement)
        conn.commit()
        logs.pool_connected(name)

    return ConnectionPool(
        settings.database_url,
        min_size=size,
        max_size=size + 1,
        name=name,
        open=False,
        configure=configure,
        kwargs={
            "application_name": f"tpx:{settings.consumer}"[:63],
            "connect_timeout": PG_CONNECT_TIMEOUT_S,
        },
    )
