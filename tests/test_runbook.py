"""OPERATIONS.md is executable: each `runbook-test` block runs here, as an operator would paste it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
import redis
import yaml
from psycopg import sql

from tests.helpers import Serve, add_entries, pending_count, record, row_count, wait_for, xrevrange
from tpx.config import Settings
from tpx.engine.service import Engine
from tpx.schema import migrate

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
RUNBOOK = (ROOT / "OPERATIONS.md").read_text()
BLOCK_RE = re.compile(r"<!-- runbook-test: ([\w-]+) -->\s*```sh\n(.*?)```", re.S)
BLOCKS = dict(BLOCK_RE.findall(RUNBOOK))


def run_block(name: str, env: dict[str, str], **variables: str) -> str:
    script = "set -euo pipefail\n" + BLOCKS[name]
    full_env = {
        **os.environ,
        **env,
        **variables,
        "COLUMNS": "160",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    result = subprocess.run(["bash", "-c", script], env=full_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"block {name} failed:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout + result.stderr


@pytest.fixture
def env(serve_env: dict[str, str], settings: Settings) -> dict[str, str]:
    migrate(settings.database_url, settings.db_schema)
    return {k: v for k, v in serve_env.items() if k != "TPX_CONSUMER"}


def strand(client: redis.Redis, settings: Settings, consumer: str, entries: list[dict[str, str]]) -> None:
    if not client.exists(settings.stream):
        client.xgroup_create(settings.stream, settings.group, id="$", mkstream=True)
    add_entries(client, settings.stream, entries)
    client.xreadgroup(settings.group, consumer, {settings.stream: ">"}, count=len(entries))


def test_the_table_of_contents_lists_every_section() -> None:
    """Each `## ` section is in the contents at the top, in order, with a link GitHub resolves."""
    headings = re.findall(r"^## (.+)$", RUNBOOK, re.M)
    listed = re.findall(r"^- \[(.+?)\]\(#([^)]+)\)$", RUNBOOK, re.M)
    assert [title for title, _ in listed] == headings
    for title, anchor in listed:  # GitHub's slug: lower case, punctuation dropped, spaces to -
        assert anchor == re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-"), title


def test_every_block_is_tested() -> None:
    assert set(BLOCKS) == {"view-lag", "claim-dead", "dlq", "dlq-replay", "rehydrate", "scale-in", "panic"}


def test_view_lag(settings: Settings, rclient: redis.Redis, env: dict[str, str]) -> None:
    strand(rclient, settings, "tpx-a", [record("v", ts=1_790_000_000_000 + i) for i in range(3)])
    out = run_block("view-lag", env)
    assert "DEAD, HAS PENDING" in out and "tpx-a" in out


def test_claim_dead(settings: Settings, rclient: redis.Redis, env: dict[str, str]) -> None:
    strand(rclient, settings, "tpx-dead-9", [record("c", ts=1_790_000_000_000 + i) for i in range(40)])
    out = run_block("claim-dead", env, DEAD="tpx-dead-9")
    assert "would claim 40" in out and "40 written" in out and "removed from the group" in out
    assert row_count(settings.database_url, settings.db_schema) == 40
    assert pending_count(rclient, settings.stream) == 0


def _dead_letters(settings: Settings, rclient: redis.Redis) -> None:
    """Real dead letters of both stages, made by the engine itself."""
    s = settings.model_copy(update={"max_deliveries": 1})
    now = int(time.time() * 1000)
    bad_io = record("w", ts=now - 1000, io={"s": "nul\u0000"})
    add_entries(rclient, s.stream, [bad_io, {"device_id": "d", "record": "[]"}, record("ok", ts=now - 5)])
    hook = threading.excepthook
    engine = Engine(s)
    engine.start()
    try:
        wait_for(lambda: rclient.xlen(s.dlq_stream) == 2, what="2 dead letters")
    finally:
        engine.shutdown()
        threading.excepthook = hook


def test_dlq_inspect(settings: Settings, rclient: redis.Redis, env: dict[str, str]) -> None:
    _dead_letters(settings, rclient)
    out = run_block("dlq", env)
    assert "record must be a JSON object" in out and "UntranslatableCharacter" in out
    assert "original fields" in out and "exported 2 dead letters" in out


def test_dlq_replay(settings: Settings, rclient: redis.Redis, env: dict[str, str]) -> None:
    _dead_letters(settings, rclient)
    length = rclient.xlen(settings.stream)
    out = run_block("dlq-replay", env)
    assert "would-replay" in out and "1 replayed" in out
    assert rclient.xlen(settings.dlq_stream) == 0
    assert rclient.xlen(settings.stream) == length + 2
    newest = xrevrange(rclient, settings.stream, count=2)
    assert all(fields[b"replays"] == b"1" for _, fields in newest)


def test_rehydrate(
    settings: Settings, rclient: redis.Redis, env: dict[str, str], serve_env: dict[str, str], tmp_path: Path
) -> None:
    serve = Serve(serve_env, tmp_path / "serve.log").start()
    try:
        wait_for(lambda: serve.get("/readyz")[0] == 200, what="ready")
        add_entries(rclient, settings.stream, [record("356307042441013", ts=int(time.time() * 1000) - 100)])
        wait_for(lambda: serve.get("/devices/356307042441013")[0] == 200, what="cached")
        out = run_block("rehydrate", env)
        assert "cached by serve-1" in out and "confirmed by serve-1" in out
    finally:
        serve.stop()


def test_scale_in(settings: Settings, rclient: redis.Redis, env: dict[str, str]) -> None:
    rclient.xgroup_create(settings.stream, settings.group, id="$", mkstream=True)
    rclient.xgroup_createconsumer(settings.stream, settings.group, "tpx-old-1")
    out = run_block("scale-in", env, GONE="tpx-old-1")
    assert "claimed 0 entries" in out and "removed from the group" in out
    assert rclient.xinfo_consumers(settings.stream, settings.group) == []


def test_panic(settings: Settings, env: dict[str, str], tmp_path: Path) -> None:
    s = settings.model_copy(update={"panic_dir": str(tmp_path / "dumps")})
    engine = Engine(s)
    try:
        raise RuntimeError("boom in a writer")
    except RuntimeError as exc:
        engine.write_panic_dump("tpx-writer-0", exc)
    out = run_block("panic", env, TPX_PANIC_DIR=s.panic_dir)
    assert "tpx-writer-0 | RuntimeError: boom in a writer" in out and "queued batches: 0" in out


def test_alert_rules_use_only_exported_metrics(
    serve_env: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert len(exprs) >= 5
    used = {m for e in exprs for m in re.findall(r"\btpx_[a-z_]+", e)}
    migrate(settings.database_url, settings.db_schema)
    # the CMS's tables too, so that the domain stage runs and exports its metrics
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(settings.db_schema)))
        conn.execute((ROOT / "deploy" / "directus" / "no-postgis.sql").read_text())
    serve = Serve({**serve_env, "TPX_DOMAIN": "on"}, tmp_path / "serve.log").start()
    try:
        wait_for(lambda: serve.get("/readyz")[0] == 200, what="ready")
        _, metrics = serve.get("/metrics")
    finally:
        serve.stop()
    exported = {line.split("{")[0].split(" ")[0] for line in metrics.splitlines() if line.startswith("tpx_")}
    # absent where Redis cannot tell (before 7.0, or a group on an empty stream): documented as such
    exported |= {"tpx_group_lag"}
    missing = sorted(m for m in used if m not in exported)
    assert not missing, f"alerts use metrics tpx does not export: {missing}"
    documented = set(re.findall(r"`(tpx_[a-z_]+)", RUNBOOK))
    undocumented = sorted(
        m
        for m in exported
        if m.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        not in documented
        and m not in documented
    )
    assert not undocumented, f"metrics missing from OPERATIONS.md: {undocumented}"


def _json_pipelines() -> list[str]:
    """Every `tpx ... --json | python3 -c '...'` pipeline in OPERATIONS.md (inside `$(...)` too)."""
    found = []
    for line in RUNBOOK.splitlines():
        if "--json | python3" not in line:
            continue
        command = line.strip()
        if "$(" in command:  # ID=$(tpx ... | python3 -c '...')
            command = command[command.index("$(") + 2 : command.rindex(")")]
        found.append(command.split("  #", 1)[0].strip())
    return found


def test_runbook_json_examples_are_valid(
    settings: Settings, rclient: redis.Redis, env: dict[str, str]
) -> None:
    """Each --json pipeline the runbook pastes into python runs against real output.

    A key the runbook reads that the command no longer prints is a KeyError in the pipeline:
    a non-zero exit and a traceback, so this fails.
    """
    pipelines = _json_pipelines()
    assert len(pipelines) >= 2, pipelines  # tpx status --json, tpx dlq list --json
    _dead_letters(settings, rclient)  # so `dlq list --json` has a first entry to read
    full_env = {**os.environ, **env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in pipelines:
        out = subprocess.run(
            ["bash", "-c", f"set -euo pipefail; {command}"],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0 and "Traceback" not in out.stderr, f"{command}\n{out.stderr}"
        assert out.stdout.strip(), f"{command} printed nothing"
