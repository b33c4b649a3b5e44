"""Read-only views of a running pipeline: status, instances, pending entries.

Each function takes a Redis client and the settings, asks Redis, and returns
plain dataclasses. The CLI renders them as tables or JSON; the dashboard
shows the same objects; the tests assert on them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
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
#: Seconds to wait for a silent consumer's /healthz: a live instance answers in milliseconds, and
#: `tpx status` must not hang on a host that drops packets.
PROBE_TIMEOUT_S = 0.5
#: Consumers without a heartbeat probed per status: a group of stale pod names stays quick.
MAX_PROBES = 16
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 (bind addresses, read not bound)


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
    #: {"writer", "for_s", "reason"} of each failing writer (empty from instances before 0.x)
    writers_failing_detail: list[dict[str, Any]] = field(default_factory=list)
    #: its HTTP listener, host:port as it bound it (None: off)
    http: str | None = None
    e2e_p50_s: float | None = None
    e2e_p95_s: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class DomainWorkerView:
    """A live `tpx domain`, from its heartbeat (:class:`tpx.domainstage.worker.Presence`)."""

    consumer: str
    host: str = ""
    pid: int = 0
    version: str = ""
    heartbeat_age_s: float = 0.0
    #: devices with fixes waiting for it, and how long the oldest has waited (its last count)
    waiting_devices: int = 0
    waiting_s: float = 0.0
    #: why its passes fail, until one succeeds (its /readyz note), if they do
    problem: str | None = None


@dataclass
class Probe:
    """What tpx learnt of a consumer that has no heartbeat: its last one, and its HTTP listener."""

    #: its newest heartbeat, kept for a day after it stops (None: none in that time)
    last_seen: Instance | None = None
    #: the /healthz probed (None: no address known, nothing probed)
    url: str | None = None
    #: whether it answered (any HTTP status); None when nothing was probed
    answers: bool | None = None
    #: why it did not answer (connection refused, timed out...)
    error: str = ""


@dataclass
class ConsumerView:
    name: str
    pending: int
    idle_ms: int
    alive: bool
    instance: Instance | None = None
    #: for a consumer without a heartbeat: what else tpx knows of it
    probe: Probe | None = None

    @property
    def failing(self) -> tuple[float, str] | None:
        """(seconds, reason) of its longest-failing writer, from its heartbeat; None: none fail."""
        detail = self.instance.writers_failing_detail if self.instance else []
        if not detail:
            if self.instance and self.instance.writers_failing:  # an older instance: names only
                return 0.0, ", ".join(self.instance.writers_failing)
            return None
        worst = max(detail, key=lambda d: float(d.get("for_s", 0)))
        return float(worst.get("for_s", 0)), f"{worst.get('writer', '?')}: {worst.get('reason', '')}"

    @property
    def answers(self) -> bool | None:
        return self.probe.answers if self.probe else None

    def to_dict(self) -> dict[str, Any]:
        from tpx.format import consumer_view_state

        out: dict[str, Any] = {
            "name": self.name,
            "pending": self.pending,
            "idle_ms": self.idle_ms,
            "alive": self.alive,
            "state": consumer_view_state(self),
        }
        failing = self.failing
        if failing is not None:
            out["writers_failing"] = {"for_s": failing[0], "reason": failing[1]}
        if self.probe is not None:
            seen = self.probe.last_seen
            out["last_heartbeat_age_s"] = seen.heartbeat_age_s if seen else None
            out["http"] = self.probe.url
            out["http_answers"] = self.probe.answers
            out["http_error"] = self.probe.error or None
        return out


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
    domain_workers: list[DomainWorkerView] = field(default_factory=list)
    at: float = field(default_factory=time.time)

    @property
    def deferring(self) -> list[str]:
        """The instances whose batches only queue their fixes for `tpx domain` (TPX_DOMAIN_DEFER)."""
        return [i.consumer for i in self.instances if i.raw.get("domain_deferred") is True]

    @property
    def dead_with_pending(self) -> list[ConsumerView]:
        """Consumers with pending entries, no heartbeat, and no HTTP listener that answers."""
        return [c for c in self.consumers if not c.alive and c.pending > 0 and c.answers is not True]

    @property
    def heartbeat_missing(self) -> list[ConsumerView]:
        """Consumers without a heartbeat whose HTTP listener answers: they still run."""
        return [c for c in self.consumers if not c.alive and c.answers is True]

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
            "consumers": [c.to_dict() for c in self.consumers],
            "instances": [{k: v for k, v in vars(i).items() if k != "raw"} for i in self.instances],
            "deferring_instances": self.deferring,
            "domain_workers": [vars(w) for w in self.domain_workers],
            "at": self.at,
        }


def instances(client: redis.Redis, stream: str) -> list[Instance]:
    """Every instance whose heartbeat has not expired, by consumer name."""
    return sorted(_documents(_heartbeats(client, keys.heartbeat_pattern(stream))), key=lambda i: i.consumer)


def domain_workers(client: redis.Redis, stream: str) -> list[DomainWorkerView]:
    """Every `tpx domain` whose heartbeat has not expired, by consumer name."""
    now = time.time()
    out = [
        DomainWorkerView(
            consumer=str(doc.get("consumer", "?")),
            host=str(doc.get("host", "")),
            pid=int(doc.get("pid", 0)),
            version=str(doc.get("version", "")),
            heartbeat_age_s=max(0.0, now - float(doc.get("at", now))),
            waiting_devices=int(doc.get("waiting_devices", 0)),
            waiting_s=float(doc.get("waiting_s", 0.0)),
            problem=doc.get("problem"),
        )
        for doc in _parsed(_heartbeats(client, keys.domain_heartbeat_pattern(stream)))
    ]
    return sorted(out, key=lambda w: w.consumer)


def _heartbeats(client: redis.Redis, pattern: str) -> list[Any]:
    """The values (MGET's answer) of the keys matching ``pattern``, in key order."""
    found = sorted(cast(list[bytes], list(client.scan_iter(match=pattern, count=HEARTBEAT_SCAN_COUNT))))
    return client.mget(found) if found else []


def _parsed(raws: list[Any]) -> Iterator[dict[str, Any]]:
    """The JSON objects among heartbeat values; missing (expired between SCAN and MGET) or bad
    ones skipped."""
    for raw in raws:
        if raw is None:
            continue
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        if isinstance(doc, dict):
            yield doc


def _documents(raws: list[Any]) -> list[Instance]:
    """The heartbeat documents ``raws`` (MGET's answer) as Instances; missing or bad ones skipped."""
    now = time.time()
    out = []
    for doc in _parsed(raws):
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
                writers_failing_detail=list(doc.get("writers_failing_detail", [])),
                http=doc.get("http"),
                e2e_p50_s=doc.get("e2e_p50_s"),
                e2e_p95_s=doc.get("e2e_p95_s"),
                raw=doc,
            )
        )
    return out


def healthz_url(instance: Instance) -> str | None:
    """Where the instance's /healthz answers (a wildcard bind is reached by its host name)."""
    if not instance.http:
        return None
    host, _, port = instance.http.rpartition(":")
    if host.strip("[]") in _WILDCARD_HOSTS:
        host = instance.host or "127.0.0.1"
    return f"http://{host}:{port}/healthz"


def probe_http(url: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Whether anything answers HTTP at ``url`` within ``timeout`` (a 503 answers too)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 (an http:// URL we built)
            return True, ""
    except urllib.error.HTTPError:
        return True, ""
    except urllib.error.URLError as exc:
        return False, str(exc.reason)
    except OSError as exc:  # timed out, reset
        return False, str(exc) or type(exc).__name__


def probe_consumers(client: redis.Redis, stream: str, views: list[ConsumerView]) -> None:
    """Fill the :class:`Probe` of each consumer without a heartbeat: its last heartbeat and, when
    it named an HTTP listener, whether that answers (probed at once, one bound for all)."""
    from concurrent.futures import ThreadPoolExecutor

    silent = [c for c in views if not c.alive][:MAX_PROBES]
    if not silent:
        return
    seen = {i.consumer: i for i in _documents(client.mget([keys.last_seen(stream, c.name) for c in silent]))}
    for c in silent:
        last = seen.get(c.name)
        c.probe = Probe(last_seen=last, url=healthz_url(last) if last else None)
    probes = [c.probe for c in silent if c.probe is not None and c.probe.url]
    if not probes:
        return
    with ThreadPoolExecutor(max_workers=len(probes), thread_name_prefix="tpx-probe") as pool:
        answers = list(pool.map(probe_http, [cast(str, p.url) for p in probes]))
    for p, (ok, error) in zip(probes, answers, strict=True):
        p.answers, p.error = ok, error


def status(client: redis.Redis, settings: Settings, probe: bool = True) -> Status:
    """The pipeline at a glance; ``probe``: also ask each consumer without a heartbeat's HTTP
    listener whether it still runs (at most :data:`PROBE_TIMEOUT_S`)."""
    s = settings
    result = Status(stream=s.stream, group=s.group, stream_exists=bool(client.exists(s.stream)))
    result.dlq_length = int(client.xlen(s.dlq_stream))
    result.instances = instances(client, s.stream)
    result.domain_workers = domain_workers(client, s.stream)
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
    if probe:
        probe_consumers(client, s.stream, result.consumers)
    return result


@dataclass
class PendingEntry:
    id: str
    consumer: str
    idle_ms: int
    deliveries: int
    age_s: float | None
    #: the entry's device_id ("" when the entry is gone from the stream)
    device_id: str = ""
    #: the database's last reason for refusing its row (None: never refused, or not recorded)
    last_error: str | None = None


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
    if not rows:
        return []
    now = time.time()
    ids = [r["message_id"] for r in rows]
    pipe = client.pipeline(transaction=False)  # one round trip for the page: an XRANGE per entry
    for entry_id in ids:
        pipe.xrange(s.stream, entry_id, entry_id, count=1)
    pipe.hmget(keys.refusals(s.stream), ids)
    *found, errors = pipe.execute()
    return [
        PendingEntry(
            id=as_text(r["message_id"]),
            consumer=as_text(r["consumer"]),
            idle_ms=int(r["time_since_delivered"]),
            deliveries=int(r["times_delivered"]),
            age_s=entry_age_s(as_text(r["message_id"]), now),
            device_id=as_text(entry[0][1].get(b"device_id", b"")) if entry else "",
            last_error=as_text(error) if error is not None else None,
        )
        for r, entry, error in zip(rows, found, errors, strict=True)
    ]
