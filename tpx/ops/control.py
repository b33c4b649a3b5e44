"""Ask the running instances something through Redis: rehydrate a device, show its state.

A request (:class:`tpx.controlproto.ControlRequest`, the type the instances
parse) is published on the stream's control channel with a reply key;
each instance's ``tpx-control`` thread answers by pushing to that key. The
command waits (up to ``timeout``) for as many answers as there were
subscribers, and reports which live instances (by heartbeat) did not answer.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from psycopg import sql

from tpx import keys
from tpx.config import Settings
from tpx.connections import pg_connect
from tpx.controlproto import DEVICES_LIMIT_DEFAULT, ControlRequest, Op
from tpx.ops.inspect import Instance, instances

#: Seconds to wait for the instances' answers: each answers from its control thread within
#: milliseconds; a few seconds also covers one busy draining a backlog.
REPLY_WAIT_S = 3.0
#: Seconds the dashboard waits for the device states on each refresh (it refreshes every second:
#: an instance slower than this is left out of one refresh rather than stall it).
DEVICES_WAIT_S = 1.0
#: Longest single BLPOP while waiting, so the deadline is checked at least this often...
MAX_POLL_S = 1.0
#: ... and shortest, so the last moments before the deadline do not spin.
MIN_POLL_S = 0.1
#: Recent rows read per device wanted by :func:`latest_rows`: a few devices writing most of the
#: rows still leave enough distinct ones among them, and the read stays one small index scan.
RECENT_ROWS_PER_DEVICE = 20
#: ``application_name`` of the ops commands' PostgreSQL connections (``pg_stat_activity``).
PG_PURPOSE = "tpx-ops"


@dataclass
class ControlResult:
    op: str
    device: str
    replies: list[dict[str, Any]] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)  # live instances that did not answer

    @property
    def confirmed(self) -> list[str]:
        return sorted(str(r.get("consumer")) for r in self.replies if r.get("ok"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "device": self.device,
            "confirmed": self.confirmed,
            "silent": self.silent,
            "replies": self.replies,
        }


def ask(
    client: redis.Redis,
    settings: Settings,
    op: Op,
    device: str = "",
    timeout: float = REPLY_WAIT_S,
    alive: list[Instance] | None = None,
    limit: int = DEVICES_LIMIT_DEFAULT,
) -> ControlResult:
    """Publish a request and collect the answers; ``alive`` (if the caller just read the
    heartbeats) saves reading them again to name the instances that stayed silent. A device
    or limit the instances would refuse raises :class:`~tpx.controlproto.BadRequestError` here."""
    request = ControlRequest.new(settings.stream, op, device, limit)
    reply_to = keys.reply_list(settings.stream, request.id)
    receivers = int(client.publish(keys.control_channel(settings.stream), request.to_json()))
    result = ControlResult(op, device)
    deadline = time.monotonic() + timeout
    while len(result.replies) < receivers:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        popped = client.blpop([reply_to], timeout=max(MIN_POLL_S, min(left, MAX_POLL_S)))
        if popped is not None:
            result.replies.append(_reply(popped[1]))
    client.delete(reply_to)
    answered = {str(r.get("consumer")) for r in result.replies}
    live = alive if alive is not None else instances(client, settings.stream)
    result.silent = sorted(i.consumer for i in live if i.consumer not in answered)
    return result


def _reply(data: bytes | str) -> dict[str, Any]:
    """An instance's answer; anything else pushed to the reply key counts as a refusal."""
    try:
        reply = json.loads(data)
    except (ValueError, RecursionError):
        return {"ok": False}
    return reply if isinstance(reply, dict) else {"ok": False}


def cached_devices(
    client: redis.Redis,
    settings: Settings,
    limit: int = DEVICES_LIMIT_DEFAULT,
    timeout: float = DEVICES_WAIT_S,
    alive: list[Instance] | None = None,
) -> list[dict[str, Any]]:
    """The most recently active cached device states of every running instance (newest per device)."""
    asked = ask(client, settings, "devices", timeout=timeout, alive=alive, limit=limit)
    best: dict[str, dict[str, Any]] = {}
    for reply in asked.replies:
        for cached in reply.get("states", []):
            state = {**cached, "consumer": reply.get("consumer")}
            known = best.get(state["device_id"])
            if known is None or (state.get("last_ts_us") or 0) > (known.get("last_ts_us") or 0):
                best[state["device_id"]] = state
    return list(best.values())


def latest_rows(settings: Settings, limit: int = DEVICES_LIMIT_DEFAULT) -> list[dict[str, Any]]:
    """Fallback when no instance runs: each device's newest row among the most recent rows."""
    query = sql.SQL(
        "SELECT DISTINCT ON (device_id) device_id, ts, latitude, longitude, speed, valid"
        " FROM (SELECT * FROM {}.positions ORDER BY ingested_at DESC LIMIT %s) AS recent"
        " ORDER BY device_id, ts DESC"
    ).format(sql.Identifier(settings.db_schema))
    with pg_connect(settings.database_url, PG_PURPOSE) as conn:
        rows = conn.execute(query, (limit * RECENT_ROWS_PER_DEVICE,)).fetchall()
    return [
        {
            "device_id": d,
            "last_ts_us": int(ts.timestamp() * 1_000_000),
            "latitude": lat,
            "longitude": lon,
            "speed": speed,
            "valid": valid,
            "records": None,
            "duplicates": None,
            "out_of_order": None,
            "consumer": None,
        }
        for d, ts, lat, lon, speed, valid in rows[:limit]
    ]


def rehydrate_plan(client: redis.Redis, settings: Settings, device: str) -> list[str]:
    """`tpx rehydrate --dry-run`: the instances that would be asked (a device the instances
    would refuse raises here, as the real request does); nothing is published."""
    ControlRequest.new(settings.stream, "rehydrate", device, DEVICES_LIMIT_DEFAULT)
    return [i.consumer for i in instances(client, settings.stream)]


def rehydrate(
    client: redis.Redis, settings: Settings, device: str, timeout: float = REPLY_WAIT_S
) -> ControlResult:
    return ask(client, settings, "rehydrate", device, timeout)


@dataclass
class DeviceReport:
    device: str
    cached: list[dict[str, Any]] = field(default_factory=list)  # {consumer, state}
    rows: list[dict[str, Any]] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "cached": self.cached, "rows": self.rows, "silent": self.silent}


ROW_COLUMNS = (
    "ts",
    "latitude",
    "longitude",
    "speed",
    "angle",
    "altitude",
    "satellites",
    "valid",
    "event_io_id",
    "attributes",
    "received_at",
    "ingested_at",
)


def newest_rows(settings: Settings, device: str, limit: int = 10) -> list[dict[str, Any]]:
    query = sql.SQL("SELECT {} FROM {}.positions WHERE device_id = %s ORDER BY ts DESC LIMIT %s").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in ROW_COLUMNS), sql.Identifier(settings.db_schema)
    )
    with pg_connect(settings.database_url, PG_PURPOSE) as conn:
        rows = conn.execute(query, (device, limit)).fetchall()
    return [dict(zip(ROW_COLUMNS, row, strict=True)) for row in rows]


def device(
    client: redis.Redis, settings: Settings, device_id: str, limit: int = 10, timeout: float = REPLY_WAIT_S
) -> DeviceReport:
    asked = ask(client, settings, "device", device_id, timeout)
    report = DeviceReport(device_id, silent=asked.silent)
    report.cached = [
        {"consumer": r.get("consumer"), "state": r["state"]}
        for r in asked.replies
        if r.get("state") is not None
    ]
    report.rows = newest_rows(settings, device_id, limit)
    return report
