"""`tpx demo` on configured servers: start-up errors are one line, and it never writes its
simulated fleet into a stream another consumer group reads."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tpx.config import Settings

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
