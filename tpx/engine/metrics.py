"""Prometheus metrics of one engine, on a registry of its own.

Counters are bumped by the threads that own the event; values that live in
Redis or in the engine (queue depth, cache size) are read at scrape time.
The full list is documented in OPERATIONS.md.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from tpx.engine.deadletter import Stage

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)
_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000)


# the *_created series only add noise to every scrape
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.read = Counter("tpx_records_read", "Stream entries read (new and redelivered)", registry=r)
        self.written = Counter("tpx_records_written", "Rows committed to positions", registry=r)
        self.duplicates = Counter(
            "tpx_records_duplicate",
            "Records not written: (device_id, ts) already stored",
            registry=r,
        )
        self.dead_lettered = Counter(
            "tpx_records_dead_lettered",
            "Records added to the dead-letter stream",
            ["stage"],
            registry=r,
        )
        for stage in Stage:  # present at 0 from the start, so rates and alerts work
            self.dead_lettered.labels(stage)
        self.vanished = Counter(
            "tpx_records_vanished",
            "Pending entries deleted from the stream before we read them",
            registry=r,
        )
        self.claimed = Counter(
            "tpx_records_claimed", "Entries taken over from idle consumers (XAUTOCLAIM)", registry=r
        )
        self.retries = Counter(
            "tpx_write_retries", "Batch writes retried after an infrastructure failure", registry=r
        )
        self.query_errors = Counter(
            "tpx_write_query_errors",
            "Batch writes PostgreSQL could not run as written (SQLSTATE class 42, 0A, 3F), retried",
            registry=r,
        )
        self.insert_fallbacks = Counter(
            "tpx_insert_fallbacks",
            "Batches whose plain COPY met an already-stored key and went again with ON CONFLICT",
            registry=r,
        )
        self.ack_failures = Counter(
            "tpx_ack_failures",
            "XACK calls that failed (entries left pending for redelivery)",
            registry=r,
        )
        self.stage_errors = Counter(
            "tpx_stage_errors", "Post-commit stage calls that raised", ["stage"], registry=r
        )
        self.batch_seconds = Histogram(
            "tpx_batch_write_seconds",
            "Time to write and commit one batch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "tpx_batch_size", "Records per written batch", buckets=_SIZE_BUCKETS, registry=r
        )
        #: the last end-to-end latencies (s), for the heartbeat and the dashboard
        self.e2e_recent: deque[float] = deque(maxlen=256)
        self.e2e_seconds = Histogram(
            "tpx_end_to_end_seconds",
            "From the stream entry's id time to commit",
            buckets=_E2E_BUCKETS,
            registry=r,
        )

    def e2e_quantiles(self) -> tuple[float, float] | None:
        """Median and 95th percentile of the recent end-to-end latency samples (s)."""
        samples = sorted(self.e2e_recent)
        if not samples:
            return None
        return samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.95))]

    def count(self, counter: Counter, **labels: str) -> float:
        """A counter's current value, read through the registry's public API (0 before any event)."""
        family = next(iter(counter.describe())).name  # its own name, without ``_total``
        value = self.registry.get_sample_value(f"{family}_total", labels)
        return value if value is not None else 0.0

    def gauge(self, name: str, doc: str, fn: Callable[[], float]) -> None:
        """A value computed when Prometheus scrapes (queue depth, cache size...)."""
        Gauge(name, doc, registry=self.registry).set_function(fn)
