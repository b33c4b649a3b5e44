"""Output that survives pipes and scripts: the real `tpx` with stdout to a pipe, --json errors
as JSON objects with the exit code kept, export that keeps an existing file, dry runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import redis

from tests.helpers import add_entries
from tpx.config import Settings
from tpx.schema import migrate


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real `tpx` with stdout and stderr to pipes (no terminal, no COLUMNS)."""
    full = {k: v for k, v in {**os.environ, **env}.items() if k not in ("COLUMNS", "TPX_CONSUMER")}
    return subprocess.run(
        [sys.executable, "-m", "tpx", *args], env=full, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def env(serve_env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in serve_env.items() if k != "TPX_CONSUMER"}


def test_json_errors_are_json_on_stdout_with_the_exit_code(env: dict[str, str]) -> None:
    done = run({**env, "TPX_REDIS_URL": "redis://127.0.0.1:1/0"}, "status", "--json")
    assert done.returncode == 3
    error = json.loads(done.stdout)
    assert error["exit_code"] == 3 and error["error"].startswith(
        "cannot reach Redis at redis://127.0.0.1:1/0"
    )
    assert done.stderr.startswith("tpx: cannot reach Redis")  # the human line stays on stderr

    done = run({**env, "TPX_READ_COUNT": "many"}, "dlq", "list", "--json")
    assert done.returncode == 2
    error = json.loads(done.stdout)
    assert error["exit_code"] == 2 and error["errors"][0].startswith("invalid setting TPX_READ_COUNT")

    done = run(env, "dlq", "show", "nope", "--json")
    assert done.returncode == 2 and json.loads(done.stdout)["error"].startswith("not a stream entry id")
    done = run(env, "dlq", "show", "nope")  # without --json: nothing on stdout
    assert done.returncode == 2 and done.stdout == ""


def test_dlq_export_keeps_an_existing_file_and_answers_json(
    settings: Settings, rclient: redis.Redis, env: dict[str, str], tmp_path: Path
) -> None:
    add_entries(rclient, settings.dlq_stream, [{"device_id": "x", "dlq_stage": "decode", "dlq_error": "bad"}])
    target = tmp_path / "dlq.jsonl"
    target.write_text("yesterday's export\n")
    done = run(env, "dlq", "export", str(target))
    assert done.returncode == 2 and "exists: give --force" in done.stderr
    assert target.read_text() == "yesterday's export\n"
    done = run(env, "dlq", "export", str(target), "--force", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"exported": 1, "file": str(target)}
    assert json.loads(target.read_text())["device_id"] == "x"
    fresh = tmp_path / "new.jsonl"
    done = run(env, "dlq", "export", str(fresh))
    assert done.returncode == 0 and "exported 1 dead letters" in done.stderr and fresh.exists()


def test_migrate_dry_run_changes_nothing(settings: Settings, env: dict[str, str]) -> None:
    done = run(env, "migrate", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["dry_run"] and plan["would_apply"] and plan["would_apply"][0].startswith("001_")
    with psycopg.connect(settings.database_url) as conn:
        found = conn.execute(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = %s", (settings.db_schema,)
        ).fetchone()
    assert found == (0,)  # not even the schema was created
    migrate(settings.database_url, settings.db_schema)
    done = run(env, "migrate", "--dry-run")
    assert done.returncode == 0 and "0 migrations to apply (dry run" in done.stdout


def test_rehydrate_dry_run_and_a_bad_device(env: dict[str, str]) -> None:
    done = run(env, "rehydrate", "dev-1", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"device": "dev-1", "dry_run": True, "would_ask": []}
    done = run(env, "rehydrate", "dev-1", "--dry-run")
    assert "no running instance to ask about dev-1 (dry run)" in done.stdout
    done = run(env, "rehydrate", "bad id!")
    assert done.returncode == 2 and "confirmed" not in done.stdout


def test_simulate_into_a_pipe_ends_with_a_summary_line(settings: Settings, env: dict[str, str]) -> None:
    done = run(env, "simulate", "--count", "300", "--devices", "5")
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout + done.stderr and "\x1b" not in done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith(f"published 300 records to {settings.stream} in ")


def test_top_without_a_terminal_refuses_in_one_line(env: dict[str, str]) -> None:
    """`tpx top < /dev/null > file` wrote escape sequences until killed; it now says what to use."""
    result = run(env, "top")  # stdout a pipe
    assert result.returncode == 2
    assert result.stdout == ""  # not one escape sequence
    assert result.stderr.strip() == (
        "tpx: tpx top needs a terminal; without one use `tpx status --watch` (or --json)"
    )
