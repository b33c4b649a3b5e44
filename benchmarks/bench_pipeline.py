"""End-to-end throughput: tpx vs a naive consumer vs the database alone, in one run.

The same records (default 200,000 from 1,000 devices, with realistic io maps
holding ``__bigint__`` and ``__bytes__`` sentinels) are loaded into a fresh
stream (or prepared in memory) for each contender, each writing into a fresh
schema on the same Postgres:

(a) tpx end to end: a real ``tpx serve`` subprocess drains the backlog;
(b) naive: XREADGROUP COUNT 100 -> json.loads -> executemany INSERT .. ON CONFLICT
    -> commit -> XACK, one thread — the consumer most people would write first;
(c) database alone: the same records, already decoded in memory, COPY (tpx's own
    copy_rows into its staging table) + INSERT .. ON CONFLICT on one connection, batches of 2,000.

It prints records/s for each and the ratios (the machine is shared and noisy:
ratios from one run mean more than absolute numbers). ``--rss N`` additionally
drains an N-record backlog through tpx and reports its peak RSS.

Each contender also reports the CPU it costs per record: the client process, every
local PostgreSQL process and Redis (read from /proc; a remote server reads 0), and
the records/s that would give if all cores did nothing else (its CPU-bound ceiling).
tpx's run ends when Redis says every entry was delivered and acknowledged (tpx acks
only after commit), then its rows are counted once: no polling query competes with it.

Usage:
    python benchmarks/bench_pipeline.py [--records 200000] [--devices 1000] [--repeat 1]
        [--redis-url redis://127.0.0.1:6379/0] [--database-url postgresql://postgres@127.0.0.1/test]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import psycopg
import redis
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tpx.engine.commit import CREATE_STAGE_SQL, INSERT_SQL, STAGE_COPY_SQL, copy_rows
from tpx.fleet import Fleet
from tpx.records import decode_entry
from tpx.schema import migrate

LOAD_CHUNK = 5000


def load_stream(client: redis.Redis, key: str, entries: list[dict[str, str]]) -> None:
    for i in range(0, len(entries), LOAD_CHUNK):
        pipe = client.pipeline(transaction=False)
        for fields in entries[i : i + LOAD_CHUNK]:
            pipe.xadd(key, fields)  # type: ignore[arg-type]
        pipe.execute()


def count_rows(dsn: str, schema: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}.positions").format(sql.Identifier(schema))
        ).fetchone()
    return int(row[0]) if row else 0


def drop_schema(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int | str) -> float:
    """User + system CPU of a process and of its children it has reaped (0 when gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:15]) / CLOCK_TICKS  # utime stime cutime cstime


def _server_pids(name: str) -> list[str]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    pids.append(entry.name)
            except OSError:
                continue
    return pids


class CpuMeter:
    """CPU seconds spent by the client, PostgreSQL and Redis (local servers) between start and stop.

    The servers are found by process name on this machine; on a remote server their share reads 0.
    A backend that exits inside the window is counted through its parent's reaped-children time.
    """

    def __init__(self, client_pid: int | None = None, others: dict[str, int] | None = None) -> None:
        self.client_pid = client_pid
        #: more processes of the client's, each counted apart (`tpx domain`)
        self.others = others or {}
        self.before: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        client = _cpu_seconds(self.client_pid) if self.client_pid else time.process_time()
        return {
            "client": client,
            **{name: _cpu_seconds(pid) for name, pid in self.others.items()},
            "postgres": sum(_cpu_seconds(pid) for pid in _server_pids("postgres")),
            "redis": sum(_cpu_seconds(pid) for pid in _server_pids("redis-server")),
        }

    def start(self) -> None:
        self.before = self._read()

    def stop(self, records: int) -> dict[str, float]:
        """CPU microseconds per record, by process."""
        after = self._read()
        return {k: round((after[k] - self.before[k]) / records * 1e6, 2) for k in after}


def _drained(client: redis.Redis, key: str, last_id: bytes) -> bool:
    group = client.xinfo_groups(key)[0]
    return bool(group["last-delivered-id"] == last_id and group["pending"] == 0)


def peak_rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# --- (a) tpx --------------------------------------------------------------------------


def start_serve(
    args: argparse.Namespace,
    schema: str,
    key: str,
    command: tuple[str, ...] = ("serve", "--no-migrate"),
    port: int | None = None,
) -> subprocess.Popen[bytes]:
    """A `tpx serve` (or another ``command``) reading ``key`` into ``schema`` (migrated already),
    quiet, HTTP off (or on 127.0.0.1:``port``), with the ``--tpx-env`` overrides: the tpx every
    benchmark measures."""
    env = {
        **os.environ,
        "TPX_REDIS_URL": args.redis_url,
        "TPX_DATABASE_URL": args.database_url,
        "TPX_DB_SCHEMA": schema,
        "TPX_STREAM": key,
        "TPX_CONSUMER": "bench",
        "TPX_HTTP_ADDR": "off" if port is None else f"127.0.0.1:{port}",
        "TPX_LOG_FORMAT": "json",
        "TPX_LOG_LEVEL": "WARNING",
        **dict(kv.split("=", 1) for kv in args.tpx_env),
    }
    return subprocess.Popen([sys.executable, "-m", "tpx", *command], env=env)  # noqa: S603 (ours)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_up(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    """Until the process answers ``/healthz`` on ``port``: tpx serves it once every thread runs
    (the schema checked, the geofences loaded, the writers started), so that a measure never
    counts the start-up."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:  # not listening yet (a refused connection, a reset, a timeout)
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start in 60 s")


def _wait_settled(settled: Callable[[str], bool], schema: str, extra: subprocess.Popen[bytes] | None) -> None:
    while not settled(schema):
        if extra is not None and extra.poll() is not None:
            raise RuntimeError(f"the companion exited with {extra.returncode}")
        time.sleep(0.05)


def run_tpx(
    args: argparse.Namespace,
    entries: list[dict[str, str]],
    expected: int,
    prepare: Callable[[str], None] | None = None,
    companion: Callable[[str, str, int], subprocess.Popen[bytes]] | None = None,
    settled: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """tpx draining ``entries``; ``prepare(schema)`` runs after the migrations (e.g. the CMS's
    tables for the domain stage); ``companion(schema, key, port)`` starts a process beside serve
    (`tpx domain`, HTTP on ``port``), whose work is done once ``settled(schema)``: its time is
    ``settled_seconds``. The clock starts once both are up (their start-up is not throughput)."""
    client = redis.Redis.from_url(args.redis_url)
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    key = f"bench:{uuid.uuid4().hex[:8]}:t"
    staging = key + ":loading"
    migrate(args.database_url, schema)
    if prepare is not None:
        prepare(schema)
    load_stream(client, staging, entries)
    ports = free_port(), free_port()
    spawned = time.perf_counter()
    proc = start_serve(args, schema, key, port=ports[0])
    extra = companion(schema, key, ports[1]) if companion is not None else None
    settled_s = None
    try:
        wait_up(ports[0], proc, "tpx serve")
        startup_s = time.perf_counter() - spawned
        if extra is not None:
            wait_up(ports[1], extra, "the companion")
        # serve answers /healthz after it created its group on the (empty) stream: swap the backlog in
        client.xgroup_create(staging, "processor", id="0")
        meter = CpuMeter(proc.pid, {"domain": extra.pid} if extra is not None else None)
        meter.start()
        started = time.perf_counter()
        client.rename(staging, key)
        # done when every entry was delivered and acknowledged (tpx acks only after commit); asked of
        # Redis, not with a count(*) on positions, which would take PostgreSQL's CPU from tpx
        last_id = client.xinfo_stream(key)["last-generated-id"]
        while not _drained(client, key, last_id):
            if proc.poll() is not None:
                raise RuntimeError(f"tpx serve exited with {proc.returncode}")
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        if settled is not None:
            _wait_settled(settled, schema, extra)
            settled_s = time.perf_counter() - started
        cpu = meter.stop(len(entries))
        rss = peak_rss_kb(proc.pid)
        rows = count_rows(args.database_url, schema)
        if rows != expected:
            raise RuntimeError(f"tpx wrote {rows} rows, expected {expected}")
    finally:
        for process in (proc, extra):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
        client.delete(key, staging, key + ":dlq")
        drop_schema(args.database_url, schema)
    return {
        "name": "tpx end to end",
        "seconds": elapsed,
        "records": len(entries),
        "peak_rss_mb": rss / 1024,
        "cpu_us": cpu,
        "settled_seconds": settled_s,
        "startup_seconds": startup_s,
    }


# --- (b) the naive consumer ----------------------------------------------------------------

NAIVE_INSERT = """
INSERT INTO positions (device_id, ts, latitude, longitude, altitude, angle, speed, satellites,
                       priority, event_io_id, valid, attributes, received_at, ingested_at)
VALUES (%s, to_timestamp(%s / 1000.0), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,
        to_timestamp(%s / 1000.0), now())
ON CONFLICT (device_id, ts) DO NOTHING
"""


def _naive_unwrap(value: Any) -> Any:
    if isinstance(value, dict):
        if "__bigint__" in value:
            return int(value["__bigint__"])
        if "__bytes__" in value:
            import base64

            return base64.b64decode(value["__bytes__"]).hex()
        return {k: _naive_unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_naive_unwrap(v) for v in value]
    return value


def read_naive_page(client: redis.Redis, key: str) -> list[tuple[str, dict[str, str]]]:
    """The naive consumer's next page: XREADGROUP COUNT 100 BLOCK 1000, empty when none came.

    Its client decodes replies (text, not bytes) and speaks RESP2 (a [[key, entries]] reply);
    redis-py's reply type covers every client setting at once, so the page is named here.
    """
    reply = cast(list[list[Any]], client.xreadgroup("naive", "c1", {key: ">"}, count=100, block=1000))
    return cast(list[tuple[str, dict[str, str]]], reply[0][1]) if reply else []


def run_naive(args: argparse.Namespace, entries: list[dict[str, str]], expected: int) -> dict[str, Any]:
    client = redis.Redis.from_url(args.redis_url, decode_responses=True)
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    key = f"bench:{uuid.uuid4().hex[:8]}:t"
    migrate(args.database_url, schema)
    load_stream(client, key, entries)
    client.xgroup_create(key, "naive", id="0")
    conn = psycopg.connect(args.database_url)
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    conn.commit()
    meter = CpuMeter()
    meter.start()
    started = time.perf_counter()
    done = 0
    try:
        while done < len(entries):
            batch = read_naive_page(client, key)
            if not batch:
                break
            params = []
            for _, f in batch:
                rec = json.loads(f["record"])
                io = _naive_unwrap(rec.get("io") or {})
                params.append(
                    (
                        f["device_id"],
                        rec["ts"],
                        rec["lat"],
                        rec["lon"],
                        rec.get("alt"),
                        rec.get("angle"),
                        rec.get("speed"),
                        rec.get("satellites"),
                        rec.get("priority"),
                        rec.get("event_io_id"),
                        not (rec.get("satellites") == 0 or (rec["lat"] == 0 and rec["lon"] == 0)),
                        json.dumps(io),
                        int(f["received_at"]),
                    )
                )
            with conn.cursor() as cur:
                cur.executemany(NAIVE_INSERT, params)
            conn.commit()
            client.xack(key, "naive", *[i for i, _ in batch])
            done += len(batch)
        elapsed = time.perf_counter() - started
        cpu = meter.stop(len(entries))
        rows = count_rows(args.database_url, schema)
        assert rows == expected, (rows, expected)
    finally:
        conn.close()
        client.delete(key)
        drop_schema(args.database_url, schema)
    return {"name": "naive consumer", "seconds": elapsed, "records": len(entries), "cpu_us": cpu}


# --- (c) the database alone ------------------------------------------------------------------


def run_db_alone(args: argparse.Namespace, entries: list[dict[str, str]], expected: int) -> dict[str, Any]:
    now_us = time.time_ns() // 1000
    positions = [
        decode_entry(
            f"{i}-0".encode(),
            {k.encode(): v.encode() for k, v in e.items()},
            now_us=now_us,
            max_future_us=86_400_000_000,
        )
        for i, e in enumerate(entries)
    ]
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    migrate(args.database_url, schema)
    conn = psycopg.connect(args.database_url)
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    conn.execute(CREATE_STAGE_SQL)
    conn.commit()
    meter = CpuMeter()
    meter.start()
    started = time.perf_counter()
    try:
        for i in range(0, len(positions), 2000):
            with conn.cursor() as cur:
                copy_rows(cur, STAGE_COPY_SQL, positions[i : i + 2000])
                cur.execute(INSERT_SQL)
            conn.commit()
        elapsed = time.perf_counter() - started
        cpu = meter.stop(len(entries))
        assert count_rows(args.database_url, schema) == expected
    finally:
        conn.close()
        drop_schema(args.database_url, schema)
    return {"name": "database alone", "seconds": elapsed, "records": len(entries), "cpu_us": cpu}


def _ceiling(cpu_us: dict[str, float]) -> float:
    """Records/s if every core of this machine did nothing but this contender's work."""
    total = sum(cpu_us.values())
    return (os.cpu_count() or 1) * 1e6 / total if total else 0.0


def _cpu_text(cpu_us: dict[str, float]) -> str:
    parts = " + ".join(f"{name} {us:.1f}" for name, us in cpu_us.items())
    return f"CPU us/record: {parts} = {sum(cpu_us.values()):.1f} -> ceiling {_ceiling(cpu_us):,.0f}/s"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--only", choices=["tpx", "naive", "db"], action="append")
    parser.add_argument(
        "--rss", type=int, default=0, help="also drain a backlog of N records and report peak RSS"
    )
    parser.add_argument("--tpx-env", action="append", default=[], help="KEY=VALUE for the tpx subprocess")
    parser.add_argument(
        "--redis-url", default=os.environ.get("TPX_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("TPX_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1/test"),
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    fleet = Fleet(devices=args.devices, seed=42, start_ms=int(time.time() * 1000) - 30 * 86_400_000)
    entries = list(fleet.entries(args.records))
    expected = len({(e["device_id"], json.loads(e["record"])["ts"]) for e in entries})
    contenders = {"tpx": run_tpx, "naive": run_naive, "db": run_db_alone}
    chosen = args.only or list(contenders)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen}
    for _ in range(args.repeat):
        for name in chosen:
            result = contenders[name](args, entries, expected)
            result["rate"] = result["records"] / result["seconds"]
            results[name].append(result)
            print(
                f"  {result['name']:<16} {result['rate']:>10,.0f} rec/s  ({result['seconds']:.2f}s)"
                f"  {_cpu_text(result['cpu_us'])}",
                file=sys.stderr,
            )
    best = {name: max(runs, key=lambda r: r["rate"]) for name, runs in results.items()}
    summary: dict[str, Any] = {
        "records": args.records,
        "devices": args.devices,
        "repeat": args.repeat,
        "rates": {n: round(r["rate"]) for n, r in best.items()},
        "cpu_us_per_record": {n: r["cpu_us"] for n, r in best.items()},
        "cpu_bound_ceiling": {n: round(_ceiling(r["cpu_us"])) for n, r in best.items()},
    }
    if "tpx" in best and "naive" in best:
        summary["tpx_vs_naive"] = round(best["tpx"]["rate"] / best["naive"]["rate"], 2)
    if "tpx" in best and "db" in best:
        summary["tpx_vs_db_alone"] = round(best["tpx"]["rate"] / best["db"]["rate"], 2)
    if "tpx" in best:
        summary["tpx_peak_rss_mb"] = round(best["tpx"]["peak_rss_mb"], 1)
    if args.rss:
        big = list(
            Fleet(devices=args.devices, seed=7, start_ms=int(time.time() * 1000) - 60 * 86_400_000).entries(
                args.rss
            )
        )
        big_expected = len({(e["device_id"], json.loads(e["record"])["ts"]) for e in big})
        result = run_tpx(args, big, big_expected)
        summary["backlog"] = {
            "records": args.rss,
            "rate": round(args.rss / result["seconds"]),
            "peak_rss_mb": round(result["peak_rss_mb"], 1),
        }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"\n{args.records:,} records, {args.devices:,} devices, best of {args.repeat}")
    for r in best.values():
        print(f"  {r['name']:<16} {r['rate']:>10,.0f} rec/s  {_cpu_text(r['cpu_us'])}")
    for key in ("tpx_vs_naive", "tpx_vs_db_alone", "tpx_peak_rss_mb", "backlog"):
        if key in summary:
            print(f"  {key}: {summary[key]}")


if __name__ == "__main__":
    main()
