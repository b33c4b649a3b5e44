"""Multi-instance load test, end to end on one machine (see multi-instance-load-test.md).

Starts N `tpx serve` instances in one consumer group and `tpx simulate` at a
steady rate; samples every second each instance's written count (/metrics),
the group lag and the pending count; kills one instance (-9) mid-run and
restarts it later; waits for the backlog to drain; checks that the rows are
exactly the valid records; writes report.md, samples.csv and a PNG plot.

    python playbooks/multi_instance_load_test.py --instances 2 --rate 4000 --duration 40 \\
        --kill-at 15 --restart-after 8 --out playbooks/report
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tpx.fleet import Fleet
from tpx.records import DecodeError, decode_entry
from tpx.schema import migrate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Instance:
    name: str
    port: int
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    written_offset: float = 0.0  # counters restart at 0 when the process restarts

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tpx", "serve"], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def written(self) -> float | None:
        if not self.alive():
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as resp:
                for line in resp.read().decode().splitlines():
                    if line.startswith("tpx_records_written_total"):
                        return self.written_offset + float(line.split()[1])
        except OSError:
            return None
        return None


@dataclass
class Sample:
    t: float
    lag: int | None
    pending: int
    written: dict[str, float | None] = field(default_factory=dict)


def group_state(client: redis.Redis, stream: str) -> tuple[int | None, int]:
    try:
        groups = client.xinfo_groups(stream)
        pending = int(client.xpending(stream, "processor")["pending"])
    except redis.ResponseError:
        return None, 0
    lag = groups[0].get("lag") if groups else None
    return (None if lag is None else int(lag)), pending


def expected_keys(devices: int, seed: int, start_ms: int, count: int, poison: float) -> set[tuple[str, int]]:
    fleet = Fleet(devices=devices, seed=seed, start_ms=start_ms, poison_fraction=poison)
    now_us = time.time_ns() // 1000
    keys = set()
    for e in fleet.entries(count):
        try:
            p = decode_entry(
                b"0-1",
                {k.encode(): v.encode() for k, v in e.items()},
                now_us=now_us,
                max_future_us=86_400_000_000,
            )
        except DecodeError:
            continue
        keys.add((p.device_id, p.ts_us))
    return keys


def plot(samples: list[Sample], names: list[str], kill_at: float, restart_at: float, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[playbook]'): no plot", file=sys.stderr)
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for name in names:
        xs, ys = [], []
        for prev, cur in itertools.pairwise(samples):
            a, b = prev.written.get(name), cur.written.get(name)
            xs.append(cur.t)
            ys.append((b - a) / (cur.t - prev.t) if a is not None and b is not None else 0.0)
        top.plot(xs, ys, label=name)
    top.set_ylabel("rows written / s")
    top.legend()
    bottom.plot([s.t for s in samples], [s.lag or 0 for s in samples], label="group lag")
    bottom.plot([s.t for s in samples], [s.pending for s in samples], label="pending")
    bottom.set_ylabel("entries")
    bottom.set_xlabel("seconds")
    bottom.legend()
    for ax in (top, bottom):
        ax.axvline(kill_at, color="red", linestyle="--", linewidth=1)
        ax.axvline(restart_at, color="green", linestyle="--", linewidth=1)
    top.set_title("throughput per instance and lag (red: kill -9, green: restart)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> None:  # noqa: PLR0912, PLR0915  (a script, read top to bottom)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--rate", type=float, default=4000)
    parser.add_argument("--duration", type=float, default=40)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--poison", type=float, default=0.005)
    parser.add_argument("--kill-at", type=float, default=15)
    parser.add_argument("--restart-after", type=float, default=8)
    parser.add_argument("--claim-idle-ms", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=ROOT / "playbooks" / "report")
    parser.add_argument("--redis-url", default=os.environ.get("TPX_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument(
        "--database-url",
        default=os.environ.get("TPX_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--keep", action="store_true", help="keep the stream and schema afterwards")
    args = parser.parse_args()

    run_id = uuid.uuid4().hex[:8]
    stream, schema = f"loadtest:{run_id}:t", f"loadtest_{run_id}"
    args.out.mkdir(parents=True, exist_ok=True)
    migrate(args.database_url, schema)
    client = redis.Redis.from_url(args.redis_url)
    base_env = {
        **os.environ,
        "TPX_REDIS_URL": args.redis_url,
        "TPX_DATABASE_URL": args.database_url,
        "TPX_DB_SCHEMA": schema,
        "TPX_STREAM": stream,
        "TPX_LOG_FORMAT": "json",
        "TPX_CLAIM_IDLE_MS": str(args.claim_idle_ms),
        "TPX_CLAIM_INTERVAL_S": "2",
    }
    instances = []
    for i in range(1, args.instances + 1):
        port = free_port()
        env = {**base_env, "TPX_CONSUMER": f"inst-{i}", "TPX_HTTP_ADDR": f"127.0.0.1:{port}"}
        instances.append(Instance(f"inst-{i}", port, env, args.out / f"inst-{i}.log"))
    for inst in instances:
        inst.log.unlink(missing_ok=True)
        inst.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(inst.written() is not None for inst in instances):
        time.sleep(0.2)

    seed, start_ms = 42, int(time.time() * 1000) - 86_400_000
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tpx",
            "simulate",
            "--devices",
            str(args.devices),
            "--rate",
            str(args.rate),
            "--duration",
            str(args.duration),
            "--poison",
            str(args.poison),
            "--seed",
            str(seed),
            "--start-ms",
            str(start_ms),
            "--json",
        ],
        env=base_env,
        stdout=subprocess.PIPE,
    )
    t0 = time.monotonic()
    samples: list[Sample] = []
    victim = instances[0]
    killed_at = restarted_at = None
    drained_at = None
    while True:
        t = time.monotonic() - t0
        if killed_at is None and t >= args.kill_at:
            last = victim.written()
            assert victim.proc is not None
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait()
            victim.written_offset = last or 0.0
            killed_at = t
        if killed_at is not None and restarted_at is None and t >= killed_at + args.restart_after:
            victim.start()
            restarted_at = t
        lag, pending = group_state(client, stream)
        samples.append(Sample(t, lag, pending, {inst.name: inst.written() for inst in instances}))
        if sim.poll() is not None and restarted_at is not None and pending == 0 and (lag or 0) == 0:
            drained_at = t
            break
        if t > args.duration + 120:
            break
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t0 - t)))
    sim_report = json.loads(sim.communicate(timeout=30)[0] or b"{}")
    finals = {inst.name: inst.written() or 0.0 for inst in instances}
    for inst in instances:
        if inst.proc is not None and inst.proc.poll() is None:
            inst.proc.send_signal(signal.SIGTERM)
            inst.proc.wait(15)

    with psycopg.connect(args.database_url) as conn:
        rows = conn.execute(
            sql.SQL("SELECT count(*), count(DISTINCT (device_id, ts)) FROM {}.positions").format(
                sql.Identifier(schema)
            )
        ).fetchone()
    assert rows is not None
    keys = expected_keys(args.devices, seed, start_ms, int(sim_report.get("produced", 0)), args.poison)
    dlq_len = client.xlen(stream + ":dlq")
    exact = rows[0] == rows[1] == len(keys)

    with (args.out / "samples.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["t", "lag", "pending", *finals])
        for s in samples:
            writer.writerow([f"{s.t:.1f}", s.lag, s.pending, *(s.written.get(n) for n in finals)])
    plotted = plot(samples, list(finals), killed_at or 0, restarted_at or 0, args.out / "throughput-lag.png")
    total_written = sum(finals.values())
    steady = [s for s in samples if 2 <= s.t < (killed_at or args.kill_at)]
    split_line = ""
    if len(steady) >= 2:
        deltas = {n: (steady[-1].written.get(n) or 0) - (steady[0].written.get(n) or 0) for n in finals}
        whole = sum(deltas.values()) or 1
        split_line = ", ".join(f"{n} {100 * d / whole:.1f} %" for n, d in deltas.items())
    max_lag = max((s.lag or 0) for s in samples)
    lines = [
        f"# Multi-instance load test — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {os.cpu_count()} cores, PostgreSQL and Redis on the same host. "
        f"{args.instances} instances, "
        f"simulator at {args.rate:,.0f} records/s for {args.duration:.0f} s ({args.devices:,} devices, "
        f"{args.poison:.1%} poison); `inst-1` killed with -9 at {killed_at or 0:.0f} s and restarted at "
        f"{restarted_at or 0:.0f} s; claim idle threshold {args.claim_idle_ms / 1000:.0f} s.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| records published | {sim_report.get('produced', 0):,} ({sim_report.get('rate', 0):,.0f}/s) |",
        f"| split before the kill | {split_line} |",
        "| rows written per instance (whole run) | "
        + ", ".join(f"{n} {v:,.0f}" for n, v in finals.items())
        + " |",
        f"| rows in positions / expected valid records | {rows[0]:,} / {len(keys):,} |",
        f"| duplicates in positions | {rows[0] - rows[1]} |",
        f"| dead letters | {dlq_len:,} |",
        f"| peak group lag | {max_lag:,} |",
        f"| drained (lag 0, nothing pending) at | {drained_at:.0f} s |" if drained_at else "| drained | NO |",
        f"| every valid record written exactly once | {'yes' if exact else 'NO'} |",
        "",
        f"Sum of per-instance written counters: {total_written:,.0f} (it includes rows written twice only "
        "if a counter restarted: the killed instance's count before the kill is added back).",
    ]
    if plotted:
        lines += ["", "![throughput and lag](throughput-lag.png)"]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.keep:
        client.delete(stream, stream + ":dlq")
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    sys.exit(0 if exact and drained_at else 1)


if __name__ == "__main__":
    main()
