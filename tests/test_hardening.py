"""Production hardening against real services: kills, outages, signals, crashes, failover."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.helpers import (
    Serve,
    add_entries,
    drained,
    pending_count,
    row_count,
    rows,
    wait_for,
    xpending_range,
    xrange,
)
from tests.proxy import Proxy, postgres_via, redis_via
from tpx.config import Settings
from tpx.fleet import Fleet
from tpx.records import DecodeError, decode_entry
from tpx.schema import migrate
from tpx.signals import SIGNAL_WINDOW_S

pytestmark = pytest.mark.slow


def fleet_entries(count: int, seed: int, poison: float = 0.02, dups: float = 0.02, late: float = 0.02):
    start = int(time.time() * 1000) - 10 * 86_400_000
    return list(
        Fleet(
            devices=40,
            seed=seed,
            start_ms=start,
            duplicate_fraction=dups,
            late_fraction=late,
            poison_fraction=poison,
        ).entries(count)
    )


def expectation(entries: list[dict[str, str]]) -> tuple[set[tuple[str, int]], int]:
    """The (device_id, ts) keys the valid entries must produce, and how many entries are poison."""
    keys: set[tuple[str, int]] = set()
    poison = 0
    now_us = time.time_ns() // 1000
    for e in entries:
        fields = {k.encode(): v.encode() for k, v in e.items()}
        try:
            p = decode_entry(b"0-1", fields, now_us=now_us, max_future_us=86_400_000_000)
        except DecodeError:
            poison += 1
            continue
        keys.add((p.device_id, p.ts_us))
    return keys, poison


def stored_keys(settings: Settings) -> list[tuple[str, int]]:
    got = rows(
        settings.database_url, settings.db_schema, "device_id, (extract(epoch FROM ts) * 1000000)::int8"
    )
    return [(d, int(t)) for d, t in got]


def dlq_sources(client: redis.Redis, settings: Settings) -> set[bytes]:
    return {f[b"dlq_source_id"] for _, f in xrange(client, settings.dlq_stream)}


def assert_exactly_once(
    client: redis.Redis, settings: Settings, keys: set[tuple[str, int]], poison: int
) -> None:
    got = stored_keys(settings)
    assert len(got) == len(set(got))
    assert set(got) == keys
    assert len(dlq_sources(client, settings)) == poison
    assert pending_count(client, settings.stream) == 0


def feeder(
    client: redis.Redis, stream: str, entries: list[dict[str, str]], chunk: int = 400, pause: float = 0.05
) -> threading.Thread:
    def run() -> None:
        for i in range(0, len(entries), chunk):
            add_entries(client, stream, entries[i : i + chunk])
            time.sleep(pause)

    thread = threading.Thread(target=run, name="test-feeder", daemon=True)
    thread.start()
    return thread


def test_kill_9_at_random_moments_loses_nothing_and_writes_nothing_twice(
    settings: Settings, rclient: redis.Redis, serve_env: dict[str, str], tmp_path: Path
) -> None:
    migrate(settings.database_url, settings.db_schema)
    entries = fleet_entries(12_000, seed=11)
    keys, poison = expectation(entries)
    env = {**serve_env, "TPX_BATCH_SIZE": "200", "TPX_READ_COUNT": "200", "TPX_WRITERS": "2"}
    feed = feeder(rclient, settings.stream, entries)
    rng = random.Random(5)
    for life in range(4):
        serve = Serve(env, tmp_path / f"serve-{life}.log").start()
        target = min(
            len(keys), row_count(settings.database_url, settings.db_schema) + rng.randrange(300, 2000)
        )

        def grown(t: int = target) -> bool:
            return row_count(settings.database_url, settings.db_schema) >= t

        wait_for(
            grown,
            timeout=60,
            what="rows to grow",
            every=0.01,
        )
        time.sleep(rng.uniform(0, 0.2))  # a random moment inside a batch cycle
        serve.kill()
    feed.join(60)
    serve = Serve(env, tmp_path / "serve-final.log").start()
    try:
        wait_for(lambda: serve.get("/readyz")[0] == 200, what="ready")
        wait_for(
            lambda: drained(rclient, settings, len(keys)),
            timeout=90,
            what="full drain",
        )
    finally:
        assert serve.stop() == 0
    assert_exactly_once(rclient, settings, keys, poison)


def settled_count(settings: Settings, still_s: float = 1.0) -> int:
    """The positions' row count once it has not moved for ``still_s`` (within 30 s)."""
    seen: list[int] = [-1]
    since: list[float] = [time.monotonic()]

    def still() -> bool:
        n = row_count(settings.database_url, settings.db_schema)
        if n != seen[0]:
            seen[0], since[0] = n, time.monotonic()
        return time.monotonic() - since[0] >= still_s

    wait_for(still, timeout=30, every=0.1, what="the rows in flight at the cut")
    return seen[0]


@pytest.mark.parametrize("service", ["postgres", "redis"])
def test_outage_mid_run_recovers_without_restart(
    service: str,
    settings: Settings,
    rclient: redis.Redis,
    serve_env: dict[str, str],
    tmp_path: Path,
    pg_proxy: Proxy,
    redis_proxy: Proxy,
) -> None:
    """Cut the connection to one service mid-load; tpx must pause, then recover by itself."""
    migrate(settings.database_url, settings.db_schema)
    entries = fleet_entries(6000, seed=12 if service == "postgres" else 13)
    keys, poison = expectation(entries)
    if service == "postgres":
        proxy = pg_proxy
        env = {**serve_env, "TPX_DATABASE_URL": postgres_via(settings.database_url, pg_proxy)}
    else:
        proxy = redis_proxy
        env = {**serve_env, "TPX_REDIS_URL": redis_via(settings.redis_url, redis_proxy)}
    env.update(TPX_BATCH_SIZE="200", TPX_QUEUE_BATCHES="2")
    serve = Serve(env, tmp_path / "serve.log").start()
    try:
        wait_for(lambda: serve.get("/readyz")[0] == 200, what="ready")
        feed = feeder(rclient, settings.stream, entries)
        wait_for(lambda: row_count(settings.database_url, settings.db_schema) > 500, what="some rows")
        at_cut = row_count(settings.database_url, settings.db_schema)
        proxy.cut()
        wait_for(lambda: serve.get("/readyz")[0] == 503, timeout=30, what="/readyz to say not ready")
        if service == "postgres":  # the outage lasts: nothing may be written meanwhile
            # but a transaction whose bytes reached the server before the cut still commits there
            # (the server learns of the lost client only when it answers): one batch per writer
            stalled = settled_count(settings)
            assert stalled <= at_cut + 2 * 200, (at_cut, stalled)  # TPX_WRITERS (2) x TPX_BATCH_SIZE
            time.sleep(2)
            assert row_count(settings.database_url, settings.db_schema) == stalled
        else:  # the instance says why it is not ready (and keeps running: asserted below)
            wait_for(lambda: "redis" in serve.get("/readyz")[1], what="/readyz to name redis")
        assert serve.proc is not None and serve.proc.poll() is None
        proxy.restore()
        feed.join(60)
        wait_for(
            lambda: drained(rclient, settings, len(keys)),
            timeout=90,
            what="recovery",
        )
        wait_for(lambda: serve.get("/readyz")[0] == 200, what="ready again")
        if service == "postgres":  # the writers retried through the outage (not restarted)
            _, metrics = serve.get("/metrics")
            retries = [line for line in metrics.splitlines() if line.startswith("tpx_write_retries_total ")]
            assert retries and float(retries[0].split()[1]) > 0, retries
    finally:
        assert serve.stop() == 0, serve.logs()
    assert_exactly_once(rclient, settings, keys, poison)


def test_sigterm_during_load_drains_and_exits_zero(
    settings: Settings, rclient: redis.Redis, serve_env: dict[str, str], tmp_path: Path
) -> None:
    migrate(settings.database_url, settings.db_schema)
    entries = fleet_entries(20_000, seed=14, poison=0, dups=0, late=0)
    ids = add_entries(rclient, settings.stream, entries)
    env = {
        **serve_env,
        "TPX_BATCH_SIZE": "100",
        "TPX_READ_COUNT": "100",
        "TPX_WRITERS": "1",
        "TPX_DRAIN_TIMEOUT_S": "5",
    }
    serve = Serve(env, tmp_path / "serve.log").start()
    wait_for(lambda: row_count(settings.database_url, settings.db_schema) > 1000, what="some rows")
    started = time.monotonic()
    serve.signal(signal.SIGTERM)
    assert serve.wait(15) == 0, serve.logs()
    assert time.monotonic() - started < 5 + 3
    pending = {row["message_id"] for row in xpending_range(rclient, settings.stream, settings.group, 100_000)}
    last = rclient.xinfo_groups(settings.stream)[0]["last-delivered-id"]
    stored = set(stored_keys(settings))
    by_id = dict(zip(ids, entries, strict=True))
    for entry_id, e in by_id.items():
        key = (e["device_id"], json.loads(e["record"])["ts"] * 1000)
        delivered = tuple(map(int, entry_id.split(b"-"))) <= tuple(map(int, last.split(b"-")))
        if delivered and entry_id not in pending:
            assert key in stored, "an acknowledged entry has no row"
        if key not in stored:
            assert entry_id in pending or not delivered, "an entry is neither stored nor pending"


def test_survivor_claims_a_killed_instances_entries(
    settings: Settings, rclient: redis.Redis, serve_env: dict[str, str], tmp_path: Path
) -> None:
    migrate(settings.database_url, settings.db_schema)
    entries = fleet_entries(8000, seed=15)
    keys, poison = expectation(entries)
    common = {
        **serve_env,
        "TPX_BATCH_SIZE": "100",
        "TPX_READ_COUNT": "100",
        "TPX_CLAIM_IDLE_MS": "1500",
        "TPX_CLAIM_INTERVAL_S": "0.5",
    }
    from tests.helpers import free_port

    a = Serve({**common, "TPX_CONSUMER": "inst-a"}, tmp_path / "a.log").start()
    b = Serve(
        {**common, "TPX_CONSUMER": "inst-b", "TPX_HTTP_ADDR": f"127.0.0.1:{free_port()}"}, tmp_path / "b.log"
    ).start()
    try:
        wait_for(lambda: a.get("/readyz")[0] == 200 and b.get("/readyz")[0] == 200, what="both ready")
        feed = feeder(rclient, settings.stream, entries, chunk=500, pause=0.02)

        def a_holds_entries() -> bool:
            consumers = {c["name"]: c for c in rclient.xinfo_consumers(settings.stream, settings.group)}
            return b"inst-a" in consumers and consumers[b"inst-a"]["pending"] > 0

        wait_for(a_holds_entries, what="instance a to hold pending entries", every=0.005)
        a.kill()
        feed.join(60)
        wait_for(
            lambda: drained(rclient, settings, len(keys)),
            timeout=90,
            what="survivor finishes",
        )
        _, metrics = b.get("/metrics")
        claimed = [line for line in metrics.splitlines() if line.startswith("tpx_records_claimed_total")]
        assert claimed and float(claimed[0].split()[1]) > 0
    finally:
        assert b.stop() == 0
    assert_exactly_once(rclient, settings, keys, poison)


def test_writer_crash_writes_a_panic_dump_and_exits_70(
    settings: Settings, rclient: redis.Redis, serve_env: dict[str, str], tmp_path: Path
) -> None:
    add_entries(rclient, settings.stream, fleet_entries(10, seed=16, poison=0, dups=0, late=0))
    # a password the server does not check (trust auth) unless it already has one of its own
    url = settings.database_url
    secret = str(conninfo_to_dict(url).get("password") or "s3cret-pw-4417")
    if "password" not in conninfo_to_dict(url):
        url = make_conninfo(url, password=secret)
    env = {**serve_env, "TPX_FAILPOINTS": "writer.commit", "TPX_DATABASE_URL": url}
    serve = Serve(env, tmp_path / "serve.log").start()
    assert serve.wait(30) == 70, serve.logs()
    dumps = list((tmp_path / "panic").glob("tpx-panic-*.json"))
    assert len(dumps) == 1
    dump = json.loads(dumps[0].read_text())
    assert dump["crashed_thread"].startswith("tpx-writer-")
    assert "FailPointError" in dump["error"]
    assert {"config", "threads", "queue_depth", "in_flight", "devices"} <= set(dump)
    assert secret not in dumps[0].read_text() and secret not in serve.logs()
    assert "***" in dump["config"]["database_url"]  # the URL is there, masked
    assert any(dump["in_flight"].values())
    assert pending_count(rclient, settings.stream) == 10  # nothing acknowledged, nothing lost


def test_device_state_survives_kill_and_restart(
    settings: Settings, rclient: redis.Redis, serve_env: dict[str, str], tmp_path: Path
) -> None:
    migrate(settings.database_url, settings.db_schema)
    fleet = Fleet(devices=5, seed=17, start_ms=int(time.time() * 1000) - 86_400_000)
    add_entries(rclient, settings.stream, list(fleet.entries(500)))
    serve = Serve(serve_env, tmp_path / "one.log").start()
    wait_for(lambda: row_count(settings.database_url, settings.db_schema) == 500, what="500 rows")
    wait_for(lambda: pending_count(rclient, settings.stream) == 0, what="all acknowledged")
    devices = [d.imei for d in fleet.devices]
    before = {d: json.loads(serve.get(f"/devices/{d}")[1]) for d in devices}
    serve.kill()
    # after the restart each device sends one late record: it is stored but must not move the state
    late = [
        {
            "device_id": d,
            "record": json.dumps(
                {"ts": before[d]["last_ts_us"] // 1000 - 60_500, "lat": 1.0, "lon": 1.0, "satellites": 5}
            ),
        }
        for d in devices
    ]
    serve = Serve(serve_env, tmp_path / "two.log").start()
    try:
        add_entries(rclient, settings.stream, late)
        wait_for(lambda: row_count(settings.database_url, settings.db_schema) == 505, what="late rows")

        def state(d: str) -> Any:
            return json.loads(wait_for(lambda: serve.get(f"/devices/{d}")[1], what="state"))

        after = {d: state(d) for d in devices}
    finally:
        serve.stop()
    fields = ("last_ts_us", "latitude", "longitude", "valid")
    for d in devices:
        assert {f: after[d][f] for f in fields} == {f: before[d][f] for f in fields}
        assert after[d]["speed"] == pytest.approx(before[d]["speed"], rel=1e-6)
        assert after[d]["out_of_order"] == 1


def test_refused_record_is_redelivered_then_dead_lettered(settings: Settings, rclient: redis.Redis) -> None:
    from tests.test_pipeline import running

    s = settings.model_copy(update={"max_deliveries": 2, "claim_idle_ms": 300, "claim_interval_s": 0.2})
    good = fleet_entries(20, seed=18, poison=0, dups=0, late=0)
    bad = dict(good[0])
    rec = json.loads(bad["record"])
    rec["io"] = {"s": "nul\u0000"}
    rec["ts"] -= 1
    bad["record"] = json.dumps(rec)
    add_entries(rclient, s.stream, [*good, bad])
    with running(s) as engine:
        wait_for(lambda: rclient.xlen(s.dlq_stream) == 1, timeout=30, what="the refused record in the DLQ")
        wait_for(lambda: pending_count(rclient, s.stream) == 0, what="nothing pending")
        assert engine.metrics.count(engine.metrics.claimed) >= 1
    letter = xrange(rclient, s.dlq_stream)[0][1]
    assert letter[b"dlq_stage"] == b"write" and letter[b"dlq_deliveries"] == b"2"
    assert b"Unicode" in letter[b"dlq_error"] or b"\\u0000" in letter[b"dlq_error"]
    assert row_count(s.database_url, s.db_schema) == 20


def test_pending_entry_deleted_from_the_stream_is_acknowledged(
    settings: Settings, rclient: redis.Redis
) -> None:
    from tests.test_pipeline import running

    rclient.xgroup_create(settings.stream, settings.group, id="0", mkstream=True)
    ids = add_entries(rclient, settings.stream, fleet_entries(5, seed=19, poison=0, dups=0, late=0))
    rclient.xreadgroup(settings.group, "gone", {settings.stream: ">"}, count=5)
    rclient.xdel(settings.stream, ids[2])
    s = settings.model_copy(update={"claim_idle_ms": 100, "claim_interval_s": 0.2})
    time.sleep(0.15)  # let the dead consumer's entries pass the idle threshold
    with running(s) as engine:
        wait_for(lambda: pending_count(rclient, s.stream) == 0, what="nothing pending")
        assert engine.metrics.count(engine.metrics.vanished) == 1
    assert row_count(s.database_url, s.db_schema) == 4


def test_psycopg_connect_through_proxy_works(pg_server_url: str, pg_proxy: Proxy) -> None:
    """The proxy fixture itself: a cut breaks a live connection, a restore lets new ones in."""
    dsn = postgres_via(pg_server_url, pg_proxy)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        pg_proxy.cut()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    pg_proxy.restore()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_drain_budget_leaves_unwritten_entries_pending_and_a_second_signal_forces_exit(
    settings: Settings,
    rclient: redis.Redis,
    serve_env: dict[str, str],
    tmp_path: Path,
    pg_proxy: Proxy,
) -> None:
    migrate(settings.database_url, settings.db_schema)
    env = {
        **serve_env,
        "TPX_DATABASE_URL": postgres_via(settings.database_url, pg_proxy),
        "TPX_DRAIN_TIMEOUT_S": "2",
    }
    entries = fleet_entries(300, seed=23, poison=0, dups=0, late=0)

    # 1. the database is away: SIGTERM waits out the drain budget, exits 0, acknowledges nothing
    serve = Serve(env, tmp_path / "one.log").start()
    wait_for(lambda: serve.get("/readyz")[0] == 200, what="ready")
    pg_proxy.cut()
    add_entries(rclient, settings.stream, entries)
    wait_for(lambda: pending_count(rclient, settings.stream) == 300, what="300 entries read, none written")
    started = time.monotonic()
    serve.signal(signal.SIGTERM)
    assert serve.wait(15) == 0, serve.logs()
    assert 1.5 <= time.monotonic() - started < 8
    assert pending_count(rclient, settings.stream) == 300
    assert row_count(settings.database_url, settings.db_schema) == 0

    # 2. the same situation, two signals: exit at once with code 4, entries still pending
    pg_proxy.restore()
    serve = Serve(env, tmp_path / "two.log").start()
    wait_for(lambda: serve.get("/readyz")[0] == 200, what="ready again")
    wait_for(lambda: row_count(settings.database_url, settings.db_schema) == 300, what="the 300 written now")
    pg_proxy.cut()
    add_entries(rclient, settings.stream, fleet_entries(100, seed=24, poison=0, dups=0, late=0))
    wait_for(lambda: pending_count(rclient, settings.stream) == 100, what="100 read, none written")
    serve.signal(signal.SIGTERM)
    time.sleep(SIGNAL_WINDOW_S + 0.2)  # signals closer together are one stop
    started = time.monotonic()
    serve.signal(signal.SIGTERM)
    assert serve.wait(10) == 4, serve.logs()
    assert time.monotonic() - started < 1.5
    assert pending_count(rclient, settings.stream) == 100
    pg_proxy.restore()
