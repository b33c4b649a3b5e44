"""Take over a dead consumer's pending entries: `tpx claim --dead-consumer X`.

The entries are XCLAIMed (page by page, only those idle for at least
``min_idle_ms``) to a consumer of this command's own, then pushed through the
very path `tpx serve` uses: the decoder, dead letters for poison, and a
:class:`~tpx.engine.writer.Writer` handling each batch in this thread (COPY,
INSERT .. ON CONFLICT, commit, XACK). When X has nothing pending any more it
is removed from the group, and so is the command's own consumer. A consumer
that still heartbeats is refused unless ``force``: it is alive, and its
entries are in flight.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import redis

from tpx.config import Settings
from tpx.connections import pg_pool
from tpx.engine.batch import Batch
from tpx.engine.deadletter import STAGE_DECODE, DeadLetter, dead_letter
from tpx.engine.metrics import Metrics
from tpx.engine.state import DeviceStates
from tpx.engine.writer import CREATE_STAGE_SQL, Writer
from tpx.errors import OpsError
from tpx.ops.inspect import instances
from tpx.records import DecodeError, decode_entry


@dataclass
class ClaimReport:
    consumer: str
    claimer: str
    dry_run: bool
    pending_before: int = 0
    claimed: int = 0
    written: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    vanished: int = 0
    left_pending: int = 0
    consumer_removed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _consumers(client: redis.Redis, settings: Settings) -> dict[str, int]:
    if not client.exists(settings.stream):
        raise OpsError(f"stream {settings.stream} does not exist")
    try:
        rows = client.xinfo_consumers(settings.stream, settings.group)
    except redis.ResponseError as exc:
        raise OpsError(f"group {settings.group} does not exist on {settings.stream}") from exc
    return {
        (r["name"].decode() if isinstance(r["name"], bytes) else r["name"]): int(r["pending"]) for r in rows
    }


def claim_dead_consumer(
    client: redis.Redis,
    settings: Settings,
    consumer: str,
    min_idle_ms: int = 0,
    dry_run: bool = False,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ClaimReport:
    consumers = _consumers(client, settings)
    if consumer not in consumers:
        known = ", ".join(sorted(consumers)) or "none"
        raise OpsError(f"no consumer {consumer!r} in group {settings.group} (known: {known})")
    alive = {i.consumer: i for i in instances(client, settings.stream)}
    if consumer in alive and not force:
        age = alive[consumer].heartbeat_age_s
        raise OpsError(
            f"consumer {consumer!r} is alive (heartbeat {age:.0f}s ago); stop it first, or use --force"
        )
    claimer = f"tpx-claim-{socket.gethostname()}-{os.getpid()}"
    report = ClaimReport(consumer, claimer, dry_run, pending_before=consumers[consumer])
    if dry_run:
        rows = client.xpending_range(
            settings.stream,
            settings.group,
            "-",
            "+",
            count=1_000_000,
            consumername=consumer,
            idle=min_idle_ms or None,
        )
        report.claimed = len(rows)
        return report

    s = settings.model_copy(update={"consumer": claimer})
    metrics = Metrics()
    pool = pg_pool(s, 1, "tpx-claim-pg", [CREATE_STAGE_SQL])
    pool.open(wait=True, timeout=10)
    writer = Writer(
        0, s, pool, client, queue.Queue(), DeviceStates(10_000), metrics, [], threading.Event(), set()
    )
    try:
        while True:
            rows = client.xpending_range(
                settings.stream,
                settings.group,
                "-",
                "+",
                count=s.read_count,
                consumername=consumer,
                idle=min_idle_ms or None,
            )
            if not rows:
                break
            ids: list[int | bytes | str | memoryview[int]] = [cast(bytes, r["message_id"]) for r in rows]
            deliveries = {cast(bytes, r["message_id"]): int(r["times_delivered"]) + 1 for r in rows}
            claimed = cast(
                list[tuple[bytes, dict[bytes, bytes] | None]],
                client.xclaim(
                    settings.stream, settings.group, claimer, min_idle_time=min_idle_ms, message_ids=ids
                ),
            )
            _process(client, s, writer, claimed, deliveries, report)
            report.claimed += len(ids)
            if progress:
                progress(report.claimed, report.pending_before)
            if len(rows) < s.read_count:
                break
    finally:
        pool.close()
    report.written = int(metrics.count(metrics.written))
    report.duplicates = int(metrics.count(metrics.duplicates))
    report.dead_lettered += int(metrics.count(metrics.dead_lettered, stage="write"))
    left = _consumers(client, settings)
    report.left_pending = left.get(claimer, 0)
    if left.get(consumer, 0) == 0:
        client.xgroup_delconsumer(settings.stream, settings.group, consumer)
        report.consumer_removed = True
    if report.left_pending == 0 and claimer in left:
        client.xgroup_delconsumer(settings.stream, settings.group, claimer)
    return report


def _process(
    client: redis.Redis,
    s: Settings,
    writer: Writer,
    claimed: list[tuple[bytes, dict[bytes, bytes] | None]],
    deliveries: dict[bytes, int],
    report: ClaimReport,
) -> None:
    now_us = time.time_ns() // 1000
    batch = Batch()
    poison: list[DeadLetter] = []
    vanished: list[bytes] = []
    for entry_id, fields in claimed:
        if not fields:
            vanished.append(entry_id)
            continue
        try:
            batch.positions.append(
                decode_entry(
                    entry_id,
                    fields,
                    now_us=now_us,
                    max_future_us=s.max_future_s * 1_000_000,
                    max_record_bytes=s.max_record_bytes,
                )
            )
            batch.deliveries[entry_id] = deliveries.get(entry_id, 1)
        except DecodeError as exc:
            poison.append(DeadLetter(entry_id, fields, STAGE_DECODE, str(exc), deliveries.get(entry_id, 1)))
    if poison:
        dead_letter(client, s.stream, s.group, s.consumer, poison)
        report.dead_lettered += len(poison)
    if vanished:
        client.xack(s.stream, s.group, *vanished)
        report.vanished += len(vanished)
    if batch.positions:
        writer.handle(batch)
