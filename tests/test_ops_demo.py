"""`tpx demo` on configured servers: start-up errors are one line, it never writes its
simulated fleet into a stream another consumer group reads, and it never creates the CMS's tables
there (it runs the domain only where they exist)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg import sql

from tpx.config import Settings
from tpx.course import create_course

pytestmark = pytest.mark.slow


def demo(env: dict[str, str], tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("TPX_")} | env
    return subprocess.run(
        [sys.executable, "-m", "tpx", "demo", "--headless", "--data-dir", str(tmp_path / "demo"), *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    return {
        "TPX_REDIS_URL": settings.redis_url,
        "TPX_DATABASE_URL": settings.database_url,
        "TPX_DB_SCHEMA": settings.db_schema,
        "TPX_STREAM": settings.stream,
    }


def test_a_taken_http_port_is_one_line(env: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = demo({**env, "TPX_HTTP_ADDR": f"127.0.0.1:{port}"}, tmp_path, "--duration", "1")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"tpx: cannot listen on 127.0.0.1:{port} (TPX_HTTP_ADDR)")
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1


def test_the_demo_refuses_a_stream_another_group_reads(
    settings: Settings, rclient: redis.Redis, env: dict[str, str], tmp_path: Path
) -> None:
    rclient.xgroup_create(settings.stream, "processor", id="$", mkstream=True)  # production's
    done = demo(env, tmp_path, "--duration", "1")
    assert done.returncode == 2
    assert f"stream {settings.stream} is read by consumer group processor, not the demo's (tpx-demo)" in (
        done.stderr
    )
    assert rclient.xlen(settings.stream) == 0  # nothing simulated was written

    rclient.xgroup_destroy(settings.stream, "processor")
    done = demo(env, tmp_path, "--duration", "1", "--rate", "50")
    assert done.returncode == 0, done.stderr
    groups = [g["name"] for g in rclient.xinfo_groups(settings.stream)]
    assert groups == [b"tpx-demo"] and rclient.xlen(settings.stream) > 0


def tables_in(settings: Settings) -> set[str]:
    """The tables the demo could have used or created: in the test's schema and in public."""
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema IN (%s, 'public')",
            (settings.db_schema,),
        ).fetchall()
    return {r[0] for r in rows}


def test_on_a_configured_database_the_demo_creates_no_cms_tables(
    settings: Settings, env: dict[str, str], tmp_path: Path
) -> None:
    done = demo(env, tmp_path, "--duration", "2", "--rate", "200", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["timing_records"] is None
    assert summary["domain"].startswith("domain off: table geofences not found"), summary["domain"]
    assert {"geofences", "timing_records"}.isdisjoint(tables_in(settings))
    assert "positions" in tables_in(settings)


@pytest.mark.timeout(120)
def test_on_a_configured_database_with_the_tables_the_demo_writes_timing_records(
    settings: Settings, env: dict[str, str], tmp_path: Path
) -> None:
    create_course(settings)  # as a CMS would have them: the demo's own course, in the test's schema
    done = demo(env, tmp_path, "--duration", "5", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["domain"].startswith("domain on:"), summary["domain"]
    with psycopg.connect(settings.database_url) as conn:
        table = sql.Identifier(settings.db_schema, "timing_records")
        row = conn.execute(
            sql.SQL("SELECT count(*), count(DISTINCT geofence) FROM {}").format(table)
        ).fetchone()
    assert row is not None
    stored, geofences = row
    assert 0 < stored <= summary["timing_records"], (stored, summary)
    assert geofences >= 2  # not one geofence by chance: the fleet drives the whole course
