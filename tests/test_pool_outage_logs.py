"""PostgreSQL outages in the logs: one line per state change, not psycopg_pool's line per attempt.

A real pool (tpx's own, :func:`tpx.connections.pg_pool`) connects through the cuttable proxy
(tests/proxy.py); logging is set up as `tpx serve` sets it up (:func:`tpx.logs.setup`, text to
a buffer), and the test counts the lines an outage leaves.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

from tests.helpers import wait_for
from tests.proxy import Proxy, postgres_via
from tpx import logs
from tpx.config import Settings
from tpx.connections import pg_pool

#: What the proxy's DSN carries as a password: no line may show it.
PASSWORD = "s3cret-pw-do-not-log"  # noqa: S105 -- a test value that must not leak
POOL = "tpx-pg"
#: A text log line as tpx.logs writes it: one line per record, a traceback or a libpq hint on a
#: line of its own would not match.
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ +\[[^\]]+\] [\w.]+: ")


@pytest.fixture
def log_text(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """tpx's logging set up as for `tpx serve` (text into a buffer); the test's own put back.
    The outage filter starts fresh: an earlier test's pool may have closed in an outage."""
    monkeypatch.setattr(logs, "_pool_outages", logs.PoolOutages())
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    pool_logger = logging.getLogger(logs.POOL_LOGGER)
    saved_filters, saved_pool_level = list(pool_logger.filters), pool_logger.level
    buffer = io.StringIO()
    logs.setup("INFO", "text", "test", stream=buffer)
    yield buffer
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    pool_logger.filters[:] = saved_filters
    pool_logger.setLevel(saved_pool_level)


@pytest.fixture
def pool(settings: Settings, pg_proxy: Proxy) -> Iterator[ConnectionPool]:
    """tpx's writer pool (4 connections) to PostgreSQL through the proxy, with a password."""
    params: dict[str, Any] = conninfo_to_dict(postgres_via(settings.database_url, pg_proxy))
    params["password"] = PASSWORD  # the test server trusts local connections: it is never checked
    dsn = make_conninfo("", **params)
    built = pg_pool(settings.model_copy(update={"database_url": dsn}), 4, POOL, [])
    yield built
    built.close(timeout=5)


def errors(pool: ConnectionPool) -> int:
    return int(pool.get_stats().get("connections_errors", 0))


def outage_lines(text: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    return {
        "failing": [x for x in lines if f"pool '{POOL}' cannot connect to PostgreSQL" in x],
        "still": [x for x in lines if f"pool '{POOL}' still cannot connect" in x],
        "back": [x for x in lines if f"pool '{POOL}' connected to PostgreSQL again" in x],
        "psycopg": [x for x in lines if "error connecting" in x or "reconnection attempt" in x],
    }


@pytest.mark.timeout(60)
def test_an_outage_is_one_line_and_its_end_another(
    log_text: io.StringIO, pool: ConnectionPool, pg_proxy: Proxy
) -> None:
    pg_proxy.cut()
    pool.open(wait=False)
    # four connections failed at once, then each once more after psycopg_pool's back-off (~1 s)
    wait_for(lambda: errors(pool) >= 8, timeout=20, what="8 failed connection attempts")
    seen = outage_lines(log_text.getvalue())
    assert len(seen["failing"]) == 1, log_text.getvalue()
    assert seen["psycopg"] == [] and seen["still"] == [] and seen["back"] == []
    assert "server closed the connection unexpectedly" in seen["failing"][0]  # the reason, line one
    assert " WARNING " in seen["failing"][0] and "tpx.connections:" in seen["failing"][0]

    pg_proxy.restore()
    pool.wait(timeout=20)  # every connection made again
    seen = outage_lines(log_text.getvalue())
    assert len(seen["back"]) == 1 and len(seen["failing"]) == 1, log_text.getvalue()
    attempts = int(re.search(r"\((\d+) failed attempts\)", seen["back"][0]).group(1))  # type: ignore[union-attr]
    assert attempts >= 8

    before = errors(pool)
    pg_proxy.cut()  # the next outage: the pool finds its connections broken and reconnects
    pool.check()
    wait_for(lambda: errors(pool) >= before + 4, timeout=20, what="failed attempts of outage 2")
    seen = outage_lines(log_text.getvalue())
    assert len(seen["failing"]) == 2 and len(seen["back"]) == 1 and seen["psycopg"] == []

    text = log_text.getvalue()
    assert PASSWORD not in text
    assert all(LINE.match(x) for x in text.splitlines()), text  # every record on one line


@pytest.mark.timeout(60)
def test_a_long_outage_is_reminded_at_most_every_n_seconds(
    log_text: io.StringIO, pool: ConnectionPool, pg_proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "POOL_OUTAGE_REMINDER_S", 0.5)
    pg_proxy.cut()
    pool.open(wait=False)
    # 4 attempts at once, 4 more ~1 s later (one reminder: they come within 0.2 s of each other)
    wait_for(lambda: errors(pool) >= 8, timeout=20, what="8 failed connection attempts")
    seen = outage_lines(log_text.getvalue())
    assert len(seen["failing"]) == 1 and len(seen["still"]) == 1, log_text.getvalue()
    assert re.search(
        r"still cannot connect to PostgreSQL after \ds \([5-8] attempts\): connection failed: ",
        seen["still"][0],
    )
    assert seen["psycopg"] == []


def test_a_multi_line_reason_is_one_line_without_the_password() -> None:
    multi = (
        "connection failed: Multiple connection attempts failed. All failures were:\n"
        "- host: 'db', port: '5432', hostaddr: '10.0.0.7': connection failed: Connection refused\n"
        "\tIs the server running on that host and accepting TCP/IP connections?\n"
        "- host: 'db', port: '5432', hostaddr: '10.0.0.8': connection failed: Connection refused"
    )
    assert logs.one_line_reason(multi) == (
        "connection failed: Multiple connection attempts failed. All failures were: host: 'db', "
        "port: '5432', hostaddr: '10.0.0.7': connection failed: Connection refused"
    )
    assert logs.one_line_reason("invalid dsn postgresql://tpx:hunter2@db/fleet\nmore") == (
        "invalid dsn postgresql://tpx:***@db/fleet"
    )
