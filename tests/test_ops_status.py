"""`tpx status` tells the truth about each instance: writers failing, a heartbeat missing from an
instance that still runs, a dead one (with the command that claims its entries); output read
from a pipe, as a script or `docker exec` reads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg import sql

from tests.helpers import Serve, add_entries, record, wait_for
from tests.proxy import Proxy, redis_via
from tests.test_ops_pipes import run
from tpx import keys
from tpx.config import Settings
from tpx.schema import migrate

pytestmark = pytest.mark.slow


def status_json(env: dict[str, str]) -> Any:
    done = run(env, "status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def consumer(env: dict[str, str], name: str) -> Any:
    return next(c for c in status_json(env)["consumers"] if c["name"] == name)


def test_failing_writers_show_with_their_reason(
    settings: Settings, rclient: redis.Redis, serve_env: dict[str, str], tmp_path: Path
) -> None:
    migrate(settings.database_url, settings.db_schema)
    serve = Serve(serve_env, tmp_path / "serve.log").start()
    try:
        wait_for(lambda: serve.get("/readyz")[0] == 200, what="ready")
        with psycopg.connect(settings.database_url, autocommit=True) as conn:  # the writes now fail
            conn.execute(
                sql.SQL("ALTER TABLE {}.positions RENAME TO gone").format(sql.Identifier(settings.db_schema))
            )
        add_entries(rclient, settings.stream, [record("wf", ts=1_790_000_000_000)])
        wait_for(lambda: "writers_failing" in consumer(serve_env, "serve-1"), what="writers failing")
        c = consumer(serve_env, "serve-1")
        assert c["alive"] and c["state"].startswith("alive, WRITERS FAILING ")
        assert "tpx-writer-" in c["writers_failing"]["reason"]
        assert 'relation "' in c["writers_failing"]["reason"] and "does not exist" in c["state"]
        out = run(serve_env, "status").stdout
        row = next(line for line in out.splitlines() if "serve-1" in line and "WRITERS FAILING" in line)
        assert "does not exist" in row  # one row, not wrapped into a column of fragments
        assert "writers failing on serve-1" in out
    finally:
        serve.stop()


def test_heartbeat_missing_is_not_dead(
    settings: Settings,
    rclient: redis.Redis,
    serve_env: dict[str, str],
    redis_proxy: Proxy,
    tmp_path: Path,
) -> None:
    """An instance that lost Redis still runs: not `DEAD`, and no claim advised; once it is
    killed, it is dead and the hint is the full claim command."""
    migrate(settings.database_url, settings.db_schema)
    env = {**serve_env, "TPX_REDIS_URL": redis_via(settings.redis_url, redis_proxy)}
    serve = Serve(env, tmp_path / "serve.log").start()
    try:
        wait_for(lambda: serve.get("/readyz")[0] == 200, what="ready")
        wait_for(lambda: rclient.exists(keys.heartbeat(settings.stream, "serve-1")), what="heartbeat")
        redis_proxy.cut()
        # it holds entries it read before the outage; its heartbeat expires (deleted here: what the
        # TTL does 15 s later)
        add_entries(rclient, settings.stream, [record("hb", ts=1_790_000_000_000 + i) for i in range(3)])
        rclient.xreadgroup(settings.group, "serve-1", {settings.stream: ">"}, count=3)
        rclient.delete(keys.heartbeat(settings.stream, "serve-1"))

        c = consumer(serve_env, "serve-1")
        assert c["alive"] is False and c["state"] == "HEARTBEAT MISSING, HAS PENDING"
        assert c["http_answers"] is True and c["last_heartbeat_age_s"] is not None
        done = run(serve_env, "status")
        assert done.returncode == 0
        assert "DEAD" not in done.stdout and "tpx claim" not in done.stdout
        assert "answers: it still runs" in done.stdout and "do not claim" in done.stdout

        serve.kill()
        c = consumer(serve_env, "serve-1")
        assert c["state"] == "DEAD, HAS PENDING" and c["http_answers"] is False and c["http_error"]
        out = run(serve_env, "status").stdout
        assert "does not answer" in out and "last heartbeat" in out
        assert "run tpx claim --dead-consumer serve-1" in out
    finally:
        if serve.proc is not None and serve.proc.poll() is None:
            serve.stop()
