"""Ops commands against real Redis and Postgres, a running `tpx serve`, real pending entries
and real dead letters; both the human and the --json output."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from tests.helpers import (
    Serve,
    add_entries,
    pending_count,
    record,
    redis_major,
    row_count,
    wait_for,
    xrange,
    xreadgroup,
)
from tpx import keys
from tpx.cli import app
from tpx.config import Settings
from tpx.schema import migrate

pytestmark = pytest.mark.slow

runner = CliRunner()


def tpx(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env={**env, "COLUMNS": "200"})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def tpx_json(env: dict[str, str], *args: str):
    code, out, err = tpx(env, *args, "--json")
    assert code == 0, (out, err)
    return json.loads(out)


@pytest.fixture
def env(serve_env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in serve_env.items() if k != "TPX_CONSUMER"}


@pytest.fixture
def serve(settings: Settings, serve_env: dict[str, str], tmp_path: Path) -> Iterator[Serve]:
    migrate(settings.database_url, settings.db_schema)
    proc = Serve(serve_env, tmp_path / "serve.log").start()
    wait_for(lambda: proc.get("/readyz")[0] == 200, what="serve ready")
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        proc.stop()


def strand(
    client: redis.Redis, settings: Settings, consumer: str, entries: list[dict[str, str]]
) -> list[bytes]:
    """Entries read by a consumer that then died: pending under its name."""
    if not client.exists(settings.stream):
        client.xgroup_create(settings.stream, settings.group, id="$", mkstream=True)
    ids = add_entries(client, settings.stream, entries)
    got = xreadgroup(client, settings.group, consumer, {settings.stream: ">"}, count=len(entries))
    assert sum(len(e) for _, e in got) == len(entries)
    return ids


def test_status_shows_stream_group_consumers_and_instances(
    settings: Settings, rclient: redis.Redis, serve: Serve, env: dict[str, str]
) -> None:
    add_entries(
        rclient, settings.stream, [record("st-dev", ts=int(time.time() * 1000) - 5000 + i) for i in range(3)]
    )
    wait_for(
        lambda: (
            pending_count(rclient, settings.stream) == 0
            and row_count(settings.database_url, settings.db_schema) == 3
        ),
        what="3 rows",
    )
    wait_for(lambda: tpx_json(env, "status")["instances"], what="heartbeat visible")
    data = tpx_json(env, "status")
    assert data["stream"] == settings.stream and data["stream_exists"] and data["group_exists"]
    assert data["stream_length"] == 3
    assert data["dlq_length"] == 0
    consumers = {c["name"]: c for c in data["consumers"]}
    assert consumers == {
        "serve-1": {
            "name": "serve-1",
            "pending": 0,
            "idle_ms": consumers["serve-1"]["idle_ms"],
            "alive": True,
            "state": "alive",
        }
    }
    assert data["pending"] == 0 and data["oldest_pending_id"] is None
    assert [i["consumer"] for i in data["instances"]] == ["serve-1"]
    assert data["instances"][0]["pid"] == serve.proc.pid  # type: ignore[union-attr]
    code, out, _ = tpx(env, "status")
    assert code == 0
    assert settings.stream in out and "serve-1" in out and "alive" in out


def test_status_flags_a_dead_consumer_with_pending(
    settings: Settings, rclient: redis.Redis, env: dict[str, str]
) -> None:
    migrate(settings.database_url, settings.db_schema)
    strand(rclient, settings, "tpx-old", [record("d", ts=1_700_000_000_000 + i) for i in range(4)])
    data = tpx_json(env, "status")
    assert data["pending"] == 4 and data["instances"] == []
    assert data["oldest_pending_age_s"] is not None
    _, out, _ = tpx(env, "status")
    assert "DEAD, HAS PENDING" in out and "tpx claim --dead-consumer" in out


def test_pending_lists_entries_and_filters(
    settings: Settings, rclient: redis.Redis, env: dict[str, str]
) -> None:
    strand(rclient, settings, "c1", [record("d", ts=1_700_000_000_000 + i) for i in range(3)])
    strand(rclient, settings, "c2", [record("d", ts=1_700_000_100_000 + i) for i in range(2)])
    rows = tpx_json(env, "pending")
    assert len(rows) == 5 and rows[0]["deliveries"] == 1
    assert [r["consumer"] for r in tpx_json(env, "pending", "--consumer", "c2")] == ["c2", "c2"]
    assert tpx_json(env, "pending", "--min-idle", "3600000") == []
    code, out, err = tpx(env, "pending", "--consumer", "nobody")
    assert code == 1 and "no consumer 'nobody'" in err and "c1" in err
    assert len(tpx_json(env, "pending", "--limit", "2")) == 2
    code, out, _ = tpx(env, "pending", "--limit", "2")
    assert code == 0 and out.count("c1") == 2 and "c2" not in out  # oldest first: c1's two


def test_claim_dead_consumer(settings: Settings, rclient: redis.Redis, env: dict[str, str]) -> None:
    migrate(settings.database_url, settings.db_schema)
    entries = [record("claimed", ts=1_790_000_000_000 + i) for i in range(250)]
    entries.append({"device_id": "claimed", "record": "{oops"})
    strand(rclient, settings, "dead-1", entries)
    preview = tpx_json(env, "claim", "--dead-consumer", "dead-1", "--dry-run")
    assert preview["claimed"] == 251 and pending_count(rclient, settings.stream) == 251
    code, _, err = tpx(env, "claim", "--dead-consumer", "nobody")
    assert code == 1 and "no consumer 'nobody'" in err
    report = tpx_json(env, "claim", "--dead-consumer", "dead-1")
    assert report["written"] == 250 and report["dead_lettered"] == 1 and report["consumer_removed"]
    assert row_count(settings.database_url, settings.db_schema) == 250
    assert pending_count(rclient, settings.stream) == 0
    names = {c["name"] for c in rclient.xinfo_consumers(settings.stream, settings.group)}
    assert b"dead-1" not in names and not any(n.startswith(b"tpx-claim-") for n in names)
    assert rclient.xlen(settings.dlq_stream) == 1


def test_claim_refuses_a_live_consumer(
    settings: Settings, rclient: redis.Redis, serve: Serve, env: dict[str, str]
) -> None:
    wait_for(lambda: rclient.exists(keys.heartbeat(settings.stream, "serve-1")), what="heartbeat")
    code, _, err = tpx(env, "claim", "--dead-consumer", "serve-1")
    assert code == 1 and "is alive" in err and "--force" in err


def test_dlq_list_show_replay_drain_export_purge(
    settings: Settings, rclient: redis.Redis, serve: Serve, env: dict[str, str], tmp_path: Path
) -> None:
    now = int(time.time() * 1000)
    bad = [
        {"device_id": "dev-a", "record": json.dumps({"ts": now, "lat": 95, "lon": 1}), "codec": "8"},
        {"device_id": "dev-b", "record": json.dumps({"ts": now, "lat": 99, "lon": 2})},
        {"device_id": "dev-b", "record": "not json"},
    ]
    add_entries(rclient, settings.stream, bad)
    wait_for(lambda: rclient.xlen(settings.dlq_stream) == 3, what="3 dead letters")

    letters = tpx_json(env, "dlq", "list")
    assert len(letters) == 3 and letters[0]["device_id"] == "dev-b"  # newest first
    assert [x["device_id"] for x in tpx_json(env, "dlq", "list", "--device", "dev-a")] == ["dev-a"]
    assert tpx_json(env, "dlq", "list", "--stage", "write") == []
    code, out, _ = tpx(env, "dlq", "list")
    assert code == 0 and "record.lat out of range" in out

    first = next(x for x in letters if x["device_id"] == "dev-a")
    shown = tpx_json(env, "dlq", "show", first["id"])
    assert shown["fields"]["codec"] == "8" and shown["stage"] == "decode"
    code, out, _ = tpx(env, "dlq", "show", first["id"])
    assert '"lat": 95' in out and "record.lat out of range" in out
    code, _, err = tpx(env, "dlq", "show", "1-1")
    assert code == 1 and "no dead letter 1-1" in err
    code, _, err = tpx(env, "dlq", "show", "nope")
    assert code == 2 and "not a stream entry id" in err

    # replay one: back on the input stream with replays=1, dead letter gone; it fails again
    dry = tpx_json(env, "dlq", "replay", first["id"], "--dry-run")
    assert dry[0]["outcome"] == "would-replay" and rclient.xlen(settings.dlq_stream) == 3
    result = tpx_json(env, "dlq", "replay", first["id"])
    assert result[0]["outcome"] == "replayed"
    replayed = xrange(rclient, settings.stream, result[0]["new_id"], result[0]["new_id"])[0][1]
    assert replayed[b"replays"] == b"1" and replayed[b"codec"] == b"8"
    assert not any(k.startswith(b"dlq_") for k in replayed)
    wait_for(lambda: any(x["replays"] == 1 for x in tpx_json(env, "dlq", "list")), what="back in the DLQ")
    again = next(x for x in tpx_json(env, "dlq", "list") if x["replays"] == 1)
    refused = tpx_json(env, "dlq", "replay", again["id"], "--max-replays", "1")
    assert refused[0]["outcome"] == "refused"

    histogram = tpx_json(env, "dlq", "drain", "--dry-run")
    assert {(h["stage"], h["count"]) for h in histogram} >= {("decode", 2)}
    assert sum(h["count"] for h in histogram) == 3
    code, out, _ = tpx(env, "dlq", "drain", "--dry-run")
    assert "record.lat out of range" in out and "…" in out

    out_file = tmp_path / "dlq.jsonl"
    code, _, err = tpx(env, "dlq", "export", str(out_file))
    assert code == 0 and "exported 3" in err
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(lines) == 3 and all("fields" in line for line in lines)

    drained = tpx_json(env, "dlq", "drain", "--max-replays", "1")
    assert sorted(r["outcome"] for r in drained) == ["refused", "replayed", "replayed"]

    wait_for(lambda: rclient.xlen(settings.dlq_stream) == 3, what="replayed letters fail again")
    assert tpx_json(env, "dlq", "purge", "--older-than", "1h", "--dry-run")["removed"] == 0
    assert tpx_json(env, "dlq", "purge", "--older-than", "0s", "--dry-run")["removed"] == 3
    assert rclient.xlen(settings.dlq_stream) == 3
    assert tpx_json(env, "dlq", "purge", "--older-than", "0s")["removed"] == 3
    assert rclient.xlen(settings.dlq_stream) == 0
    code, _, err = tpx(env, "dlq", "purge", "--older-than", "soon")
    assert code == 2 and "not a duration" in err


def test_replay_arguments_are_checked(env: dict[str, str]) -> None:
    code, _, err = tpx(env, "dlq", "replay")
    assert code == 2 and "give the dead letter ids to replay, or --all" in err and "not both" not in err
    code, _, err = tpx(env, "dlq", "replay", "1-0", "--all")
    assert code == 2 and "not both" in err


def test_rehydrate_and_device(
    settings: Settings, rclient: redis.Redis, serve: Serve, env: dict[str, str]
) -> None:
    now = int(time.time() * 1000)
    add_entries(rclient, settings.stream, [record("dev-r", ts=now - 10_000 + i) for i in range(5)])
    wait_for(lambda: row_count(settings.database_url, settings.db_schema) == 5, what="5 rows")
    wait_for(lambda: serve.get("/devices/dev-r")[0] == 200, what="cached")

    report = tpx_json(env, "device", "dev-r", "--limit", "3")
    assert report["cached"][0]["consumer"] == "serve-1"
    assert report["cached"][0]["state"]["records"] == 5
    assert len(report["rows"]) == 3
    code, out, _ = tpx(env, "device", "dev-r")
    assert "cached by serve-1" in out and "newest rows" in out

    result = tpx_json(env, "rehydrate", "dev-r")
    assert result["confirmed"] == ["serve-1"] and result["silent"] == []
    assert serve.get("/devices/dev-r")[0] == 404
    code, out, _ = tpx(env, "rehydrate", "dev-r")
    assert code == 0 and "confirmed by serve-1" in out
    # the next record reseeds it from Postgres: its newest row, not just the new record
    add_entries(rclient, settings.stream, [record("dev-r", ts=now - 20_000)])
    wait_for(lambda: serve.get("/devices/dev-r")[0] == 200, what="reseeded")
    state = json.loads(serve.get("/devices/dev-r")[1])
    assert state["last_ts_us"] == (now - 10_000 + 4) * 1000 and state["out_of_order"] == 1


def test_scrape_time_metrics_and_heartbeat_leave(
    settings: Settings, rclient: redis.Redis, serve: Serve, env: dict[str, str]
) -> None:
    add_entries(rclient, settings.stream, [{"device_id": "x", "record": "[]"}])
    # the letter is added before its original is acknowledged (never the other way round): wait
    # for both, or the scrape may fall between them (a CI run's had no tpx_pending_entries 0.0)
    wait_for(
        lambda: (
            rclient.xlen(settings.dlq_stream) == 1
            and pending_count(rclient, settings.stream, settings.group) == 0
        ),
        what="a dead letter, its original acknowledged",
    )
    _, metrics = serve.get("/metrics")
    for name in (
        "tpx_redis_up 1.0",
        "tpx_pending_entries 0.0",
        "tpx_dlq_length 1.0",
        "tpx_stream_length 1.0",
        "tpx_oldest_pending_age_seconds",
        "tpx_queue_depth",
        "tpx_device_cache_size",
        "tpx_device_rehydrations",
        "tpx_end_to_end_seconds_bucket",
    ):
        assert name in metrics, name
    if redis_major(rclient) >= 7:  # XINFO GROUPS has no lag before 7.0
        assert "tpx_group_lag 0.0" in metrics
    assert rclient.exists(keys.heartbeat(settings.stream, "serve-1"))
    assert serve.stop() == 0
    assert not rclient.exists(keys.heartbeat(settings.stream, "serve-1"))


def test_unreachable_redis_is_one_line(env: dict[str, str]) -> None:
    for args in (["status"], ["dlq", "list"], ["pending"], ["rehydrate", "x"]):
        code, out, err = tpx({**env, "TPX_REDIS_URL": "redis://127.0.0.1:1/0"}, *args)
        assert code == 3 and "cannot reach Redis" in err and "Traceback" not in err + out
