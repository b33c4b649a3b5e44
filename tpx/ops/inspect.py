"""Read-only views of a running pipeline: status, instances, pending entries.

Each function takes a Redis client and the settings, asks Redis, and returns
plain dataclasses. The CLI renders them as tables or JSON; the dashboard
shows the same objects; the tests assert on them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from tpx import keys
from tpx.config import Settings
from tpx.errors import OpsError
from tpx.streams import as_text, entry_ms, estimate_lag

#: Keys per SCAN step when looking for heartbeats: the keyspace holds a handful of tpx keys per
#: stream, so a few round trips cover even a Redis shared with much else.
HEARTBEAT_SCAN_COUNT = 500


def entry_age_s(entry_id: bytes | str | None, now: float | None = None) -> float | None:
    """Seconds since the entry was added (stream ids start with epoch milliseconds)."""
    if not entry_id:
        return None
    ms = entry_ms(entry_id)
    return max(0.0, (now or time.time()) - ms / 1000)


@dataclass
class Instance:
    """A live tpx instance, from its heartbeat."""

    consumer: str
    host: str = ""
    pid: int = 0
    version: str = ""
    started_at: float = 0.0
    heartbeat_age_s: float = 0.0
    read_per_s: float = 0.0
    written_per_s: float = 0.0
    queue_depth: int = 0
    cache_size: int = 0
    writers_failing: list[str] = field(default_factory=list)
    e2e_p50_s: float | None = None
    e2e_p95_s: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class ConsumerView:
    name: str
    pending: int
    idle_ms: int
    alive: bool
    instance: Instance | None = None


@dataclass
class Status:
    stream: str
    group: str
    stream_exists: bool
    stream_length: int = 0
    last_entry_id: str | None = None
    last_entry_age_s: float | None = None
    group_exists: bool = False
    lag: int | None = None
    pending: int = 0
    oldest_pending_id: str | None = None
    oldest_pending_age_s: float | None = None
    dlq_length: int = 0
    consumers: list[ConsumerView] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)
    at: float = field(default_factory=time.time)

    @property
    def dead_with_pending(self) -> list[ConsumerView]:
        return [c for c in self.consumers if not c.alive and c.pending > 0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "group": self.group,
            "stream_exists": self.stream_exists,
            "stream_length": self.stream_length,
            "last_entry_id": self.last_entry_id,
            "last_entry_age_s": self.last_entry_age_s,
            "group_exists": self.group_exists,
            "lag": self.lag,
            "pending": self.pending,
            "oldest_pending_id": self.oldest_pending_id,
            "oldest_pending_age_s": self.oldest_pending_age_s,
            "dlq_length": self.dlq_length,
            "consumers": [
                {"name": c.name, "pending": c.pending, "idle_ms": c.idle_ms, "alive": c.alive}
                for c in self.consumers
            ],
            "instances": [{k: v for k, v in vars(i).items() if k != "raw"} for i in self.instances],
            "at": self.at,
        }


def instances(client: redis.Redis, stream: str) -> list[Instance]:
    """Every instance whose heartbeat has not expired, by consumer name."""
    found = sorted(
        cast(
            list[bytes],
            list(client.scan_iter(match=keys.heartbeat_pattern(stream), count=HEARTBEAT_SCAN_COUNT)),
        )
    )
    if not found:
        return []
    now = time.time()
    out = []
    for raw in client.mget(found):
        if raw is None:  # expired between SCAN and MGET
            continue
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        out.append(
            Instance(
                consumer=str(doc.get("consumer", "?")),
                host=str(doc.get("host", "")),
                pid=int(doc.get("pid", 0)),
                version=str(doc.get("version", "")),
                started_at=float(doc.get("started_at", 0)),
                heartbeat_age_s=max(0.0, now - float(doc.get("at", now))),
                read_per_s=float(doc.get("read_per_s", 0)),
                written_per_s=float(doc.get("written_per_s", 0)),
                queue_depth=int(doc.get("queue_depth", 0)),
                cache_size=int(doc.get("cache_size", 0)),
                writers_failing=list(doc.get("writers_failing", [])),
                e2e_p50_s=doc.get("e2e_p50_s"),
                e2e_p95_s=doc.get("e2e_p95_s"),
                raw=doc,
            )
        )
    return sorted(out, key=lambda i: i.consumer)


def status(client: redis.Redis, settings: Settings) -> Status:
    s = settings
    result = Status(stream=s.stream, group=s.group, stream_exists=bool(client.exists(s.stream)))
    result.dlq_length = int(client.xlen(s.dlq_stream))
    result.instances = instances(client, s.stream)
    if not result.stream_exists:
        return result
    result.stream_length = int(client.xlen(s.stream))
    newest = client.xrevrange(s.stream, count=1)
    if newest:
        result.last_entry_id = as_text(newest[0][0])
        result.last_entry_age_s = entry_age_s(result.last_entry_id)
    groups = client.xinfo_groups(s.stream)
    group = next((g for g in groups if as_text(g["name"]) == s.group), None)
    if group is None:
        return result
    result.group_exists = True
    last_generated = client.xinfo_stream(s.stream)["last-generated-id"]
    result.lag = estimate_lag(client, s.stream, group, last_generated, result.stream_length)
    summary = client.xpending(s.stream, s.group)
    result.pending = int(summary["pending"])
    if summary["min"]:
        result.oldest_pending_id = as_text(summary["min"])
        result.oldest_pending_age_s = entry_age_s(result.oldest_pending_id)
    alive = {i.consumer: i for i in result.instances}
    for c in client.xinfo_consumers(s.stream, s.group):
        name = as_text(c["name"])
        result.consumers.append(
            ConsumerView(
                name=name,
                pending=int(c["pending"]),
                idle_ms=int(c["idle"]),
                alive=name in alive,
                instance=alive.get(name),
            )
        )
    return result


@dataclass
class PendingEntry:
    id: str
    consumer: str
    idle_ms: int
    deliveries: int
    age_s: float | None


def pending(
    client: redis.Redis,
    settings: Settings,
    consumer: str | None = None,
    min_idle_ms: int | None = None,
    limit: int = 100,
) -> list[PendingEntry]:
    """Pending entries, oldest first, optionally of one consumer and idle for at least ``min_idle_ms``."""
    s = settings
    if not client.exists(s.stream):
        raise OpsError(f"stream {s.stream} does not exist")
    if consumer is not None:
        known = {as_text(c["name"]) for c in client.xinfo_consumers(s.stream, s.group)}
        if consumer not in known:
            raise OpsError(
                f"no consumer {consumer!r} in group {s.group} (known: {', '.join(sorted(known)) or 'none'})"
            )
    rows = client.xpending_range(
        s.stream, s.group, min="-", max="+", count=limit, consumername=consumer, idle=min_idle_ms
    )
    now = time.time()
    return [
        PendingEntry(
            id=as_text(r["message_id"]),
            consumer=as_text(r["consumer"]),
            idle_ms=int(r["time_since_delivered"]),
            deliveries=int(r["times_delivered"]),
            age_s=entry_age_s(as_text(r["message_id"]), now),
        )
        for r in rows
    ]
