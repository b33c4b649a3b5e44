"""Take over a dead consumer's pending entries: `tpx claim --dead-consumer X`.

The entries are XCLAIMed (page by page, only those idle for at least
``min_idle_ms``) to a consumer of this command's own, then pushed through the
very steps `tpx serve` uses, in this thread: intake (the decoder, dead letters
for poison, vanished ids acknowledged: :mod:`tpx.engine.intake`) and the commit
(COPY, INSERT .. ON CONFLICT, commit, XACK, write-stage dead letters:
:class:`~tpx.engine.commit.Committer`); the report sums what they returned.
When X has nothing pending any more it is removed from the group, and so is the
command's own consumer. A consumer that still heartbeats is refused unless
``force``: it is alive, and its entries are in flight.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, cast

import redis

from tpx.config import Settings
from tpx.connections import pg_pool
from tpx.engine.batch import Batch
from tpx.engine.commit import CREATE_STAGE_SQL, Committer
from tpx.engine.intake import Entries, delivery_counts, raw_replies, settle, take_in
from tpx.engine.metrics import Metrics
from tpx.errors import OpsError
from tpx.ops.inspect import instances

#: XPENDING COUNT for ``--dry-run``: it only counts the entries, and Redis caps nothing itself.
DRY_RUN_COUNT: Final = 1_000_000
#: Seconds to wait for the PostgreSQL connection before the command gives up.
POOL_OPEN_TIMEOUT_S: Final = 10.0


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
            count=DRY_RUN_COUNT,
            consumername=consumer,
            idle=min_idle_ms or None,
        )
        report.claimed = len(rows)
        return report

    s = settings.model_copy(update={"consumer": claimer})
    raw = raw_replies(client)
    pool = pg_pool(s, 1, "tpx-claim-pg", [CREATE_STAGE_SQL])
    pool.open(wait=True, timeout=POOL_OPEN_TIMEOUT_S)
    committer = Committer(s, pool, client, Metrics(), states=None)  # no device state to keep
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
            deliveries = delivery_counts(rows, claiming=True)
            reply = raw.xclaim(
                settings.stream, settings.group, claimer, min_idle_time=min_idle_ms, message_ids=ids
            )
            # Redis 6.2 answers nil for an entry deleted meanwhile (no id: it stays pending)
            claimed = cast(Entries, [entry for entry in reply if entry is not None])
            _process(client, committer, claimed, deliveries, report)
            report.claimed += len(ids)
            if progress:
                progress(report.claimed, report.pending_before)
            if len(rows) < s.read_count:
                break
    finally:
        pool.close()
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
    committer: Committer,
    claimed: Entries,
    deliveries: dict[bytes, int],
    report: ClaimReport,
) -> None:
    """One claimed page: intake, then the commit of its valid records, summed into ``report``."""
    s = committer.settings
    intake = take_in(claimed, s, time.time_ns() // 1000, deliveries)
    settled = settle(client, s, intake.dead_letters, intake.vanished)
    report.dead_lettered += len(settled.dead_lettered)
    report.vanished += settled.acknowledged
    if settled.refusal is not None:  # Redis refuses dead letters (OOM, READONLY...): say so, stop
        raise settled.refusal
    if intake.positions:
        outcome = committer.commit(Batch(intake.positions, deliveries=intake.deliveries))
        report.written += len(outcome.inserted)
        report.duplicates += len(outcome.duplicates)
        report.dead_lettered += len(outcome.dead_lettered)
