"""Metrics read from Redis at scrape time (a custom Prometheus collector).

Group lag, pending entries, the oldest pending entry's age and the DLQ length
are properties of the stream, not of this process: they are asked of Redis
when Prometheus scrapes, never by a polling thread. When Redis cannot answer,
the series are simply absent from that scrape (and ``tpx_redis_up`` is 0);
``lag`` is absent where Redis cannot tell (before 7.0, or after deletions), and
0 when the stream's ids say nothing is left to deliver, whatever XINFO's counter
says (:func:`tpx.streams.group_lag`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tpx.config import Settings
from tpx.streams import entry_ms, group_lag


class StreamCollector(Collector):
    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.client = client

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("tpx_redis_up", "1 when the scrape could read the stream's state from Redis")
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.xinfo_groups(self.settings.stream)
            pipe.xpending(self.settings.stream, self.settings.group)
            pipe.xlen(self.settings.dlq_stream)
            pipe.xlen(self.settings.stream)
            pipe.xinfo_stream(self.settings.stream)
            groups, pending, dlq_len, stream_len, info = pipe.execute()
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        group = next(
            (g for g in groups if g["name"] in (self.settings.group, self.settings.group.encode())), None
        )
        group_lag_now = None if group is None else group_lag(group, info["last-generated-id"], stream_len)
        if group_lag_now is not None:
            lag = GaugeMetricFamily("tpx_group_lag", "Entries in the stream not yet delivered to the group")
            lag.add_metric([], float(group_lag_now))
            yield lag
        total = GaugeMetricFamily(
            "tpx_pending_entries", "Entries delivered but not acknowledged (whole group)"
        )
        total.add_metric([], float(pending["pending"]))
        yield total
        oldest = GaugeMetricFamily(
            "tpx_oldest_pending_age_seconds", "Age of the oldest unacknowledged entry (from its id)"
        )
        oldest.add_metric(
            [], max(0.0, time.time() - entry_ms(pending["min"]) / 1000) if pending["min"] else 0.0
        )
        yield oldest
        dlq = GaugeMetricFamily("tpx_dlq_length", "Entries in the dead-letter stream")
        dlq.add_metric([], float(dlq_len))
        yield dlq
        length = GaugeMetricFamily("tpx_stream_length", "Entries in the input stream")
        length.add_metric([], float(stream_len))
        yield length
