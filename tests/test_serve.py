"""`tpx serve` as a real subprocess: end to end, health endpoints, logs, signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.helpers import NOW_MS, Serve, add_entries, pending_count, record, row_count, wait_for
from tpx.config import Settings

pytestmark = pytest.mark.slow


def test_serve_end_to_end(
    settings: Settings, rclient: redis.Redis, serve_env: dict[str, str], tmp_path: Path
) -> None:
    entries = [record(f"e2e-{i % 20}", ts=NOW_MS - 50_000 + i) for i in range(2000)]
    entries.insert(500, {"device_id": "e2e-1", "record": "[]"})
    add_entries(rclient, settings.stream, entries)
    serve = Serve(serve_env, tmp_path / "serve.log").start()
    try:
        wait_for(lambda: serve.get("/readyz")[0] == 200, what="/readyz 200")
        wait_for(lambda: row_count(settings.database_url, settings.db_schema) == 2000, what="2000 rows")
        wait_for(lambda: pending_count(rclient, settings.stream) == 0, what="nothing pending")
        assert rclient.xlen(settings.dlq_stream) == 1
        status, body = serve.get("/healthz")
        assert status == 200 and json.loads(body)["ok"] is True
        _, metrics = serve.get("/metrics")
        assert "tpx_records_written_total 2000.0" in metrics
        assert "tpx_records_read_total 2001.0" in metrics
        assert 'tpx_records_dead_lettered_total{stage="decode"} 1.0' in metrics
        assert "tpx_batch_write_seconds_bucket" in metrics
        assert serve.get("/nope")[0] == 404
    finally:
        code = serve.stop()
    assert code == 0, serve.logs()
    lines = [json.loads(line) for line in serve.logs().splitlines() if line.startswith("{")]
    assert lines, serve.logs()
    assert {"time", "level", "thread", "consumer", "message"} <= set(lines[0])
    assert any(rec["thread"] == "tpx-reader" and rec["consumer"] == "serve-1" for rec in lines)
    assert any("ordinary table" in rec["message"] for rec in lines)
    assert "Traceback" not in serve.logs()


def test_sigterm_while_idle_exits_zero_quickly(serve_env: dict[str, str], tmp_path: Path) -> None:
    serve = Serve(serve_env, tmp_path / "serve.log").start()
    wait_for(lambda: serve.get("/readyz")[0] == 200, what="ready")
    serve.signal(signal.SIGTERM)
    assert serve.wait(10) == 0


def test_second_signal_forces_exit(
    settings: Settings, rclient: redis.Redis, serve_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**serve_env, "TPX_DATABASE_URL": settings.database_url}
    serve = Serve(env, tmp_path / "serve.log").start()
    wait_for(lambda: serve.get("/readyz")[0] == 200, what="ready")
    serve.signal(signal.SIGTERM)
    serve.signal(signal.SIGTERM)
    code = serve.wait(10)
    assert code in (0, 4), serve.logs()  # 4 when the second signal landed before the drain finished


def test_unreachable_redis_is_one_line_and_exit_3(serve_env: dict[str, str], tmp_path: Path) -> None:
    env = {**serve_env, "TPX_REDIS_URL": "redis://127.0.0.1:1/0"}
    serve = Serve(env, tmp_path / "serve.log").start()
    code = serve.wait(30)
    out = serve.logs()
    assert code == 3
    assert "Traceback" not in out
    assert "cannot reach Redis" in out


def test_unreachable_postgres_is_one_line_and_exit_3(serve_env: dict[str, str], tmp_path: Path) -> None:
    env = {**serve_env, "TPX_DATABASE_URL": "postgresql://tpx:s3cret@127.0.0.1:1/x"}
    serve = Serve(env, tmp_path / "serve.log").start()
    code = serve.wait(30)
    out = serve.logs()
    assert code == 3, out
    assert "Traceback" not in out and "cannot reach PostgreSQL" in out
    assert "s3cret" not in out


def tpx(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "tpx", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["serve", "--writers", "0"], {}, "TPX_WRITERS / --writers"),
        (["serve", "--writers", "many"], {}, "Invalid value for '--writers'"),
        (["serve"], {"TPX_BATCH_SIZE": "-3"}, "TPX_BATCH_SIZE"),
        (["serve"], {"TPX_REDIS_URL": "http://nope"}, "TPX_REDIS_URL"),
        (
            ["serve"],
            {"TPX_DATABASE_URL": "postgresql://u:pw@h:5432/db?sslmode=maybe&bad key"},
            "TPX_DATABASE_URL",
        ),
        (["serve"], {"TPX_HTTP_ADDR": "everywhere"}, "TPX_HTTP_ADDR"),
        (["serve", "--no-such-flag"], {}, "no-such-flag"),
        (["config"], {"TPX_LOG_LEVEL": "LOUD"}, "TPX_LOG_LEVEL"),
    ],
)
def test_bad_configuration_is_one_clear_line(args: list[str], env: dict[str, str], needle: str) -> None:
    result = tpx(*args, env=env)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert needle in result.stderr
    assert "pw@" not in result.stderr


def test_config_masks_passwords(serve_env: dict[str, str]) -> None:
    env = {
        **serve_env,
        "TPX_DATABASE_URL": "postgresql://tpx:hunter2@db:5432/fleet",
        "TPX_REDIS_URL": "redis://:redispw@cache:6379/0",
    }
    out = tpx("config", env=env)
    assert out.returncode == 0
    assert "hunter2" not in out.stdout and "redispw" not in out.stdout
    assert "postgresql://tpx:***@db:5432/fleet" in out.stdout
    data = json.loads(tpx("config", "--json", env=env).stdout)
    assert data["redis_url"] == "redis://:***@cache:6379/0"
    assert data["stream"] == serve_env["TPX_STREAM"]


def test_migrate_command(settings: Settings) -> None:
    result = tpx(
        "migrate", "--database-url", settings.database_url, "--db-schema", settings.db_schema, "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["applied"] == ["001_positions", "002_device_id_collate_c"]
    assert report["storage"] in ("table", "hypertable")


def test_serve_refuses_unmigrated_schema_with_no_migrate(serve_env: dict[str, str], tmp_path: Path) -> None:
    serve = Serve(serve_env, tmp_path / "serve.log", "--no-migrate").start()
    assert serve.wait(30) == 3
    assert "run `tpx migrate`" in serve.logs()


def test_taken_http_port_is_one_line_and_exit_3(serve_env: dict[str, str], tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        serve = Serve({**serve_env, "TPX_HTTP_ADDR": f"127.0.0.1:{port}"}, tmp_path / "serve.log").start()
        code = serve.wait(30)
    out = serve.logs()
    assert code == 3, out
    assert f"cannot listen on 127.0.0.1:{port}" in out and "Traceback" not in out
