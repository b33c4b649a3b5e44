"""Ask the running instances something through Redis: rehydrate a device, show its state.

A request is published on the stream's control channel with a reply key;
each instance's ``tpx-control`` thread answers by pushing to that key. The
command waits (up to ``timeout``) for as many answers as there were
subscribers, and reports which live instances (by heartbeat) did not answer.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis
from psycopg import sql

from tpx import keys
from tpx.config import Settings
from tpx.ops.inspect import instances


@dataclass
class ControlResult:
    op: str
    device: str
    replies: list[dict[str, Any]] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)  # live instances that did not answer

    @property
    def confirmed(self) -> list[str]:
        return sorted(str(r.get("consumer")) for r in self.replies if r.get("ok"))


def ask(client: redis.Redis, settings: Settings, op: str, device: str, timeout: float = 3.0) -> ControlResult:
    request_id = uuid.uuid4().hex
    reply_to = keys.reply_list(settings.stream, request_id)
    message = json.dumps({"op": op, "device": device, "reply_to": reply_to, "id": request_id})
    receivers = int(client.publish(keys.control_channel(settings.stream), message))
    result = ControlResult(op, device)
    deadline = time.monotonic() + timeout
    while len(result.replies) < receivers:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        popped = client.blpop([reply_to], timeout=max(0.1, min(left, 1.0)))
        if popped is not None:
            result.replies.append(json.loads(popped[1]))
    client.delete(reply_to)
    answered = {str(r.get("consumer")) for r in result.replies}
    result.silent = sorted(
        i.consumer for i in instances(client, settings.stream) if i.consumer not in answered
    )
    return result


def rehydrate(client: redis.Redis, settings: Settings, device: str, timeout: float = 3.0) -> ControlResult:
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
    with psycopg.connect(settings.database_url, connect_timeout=5) as conn:
        rows = conn.execute(query, (device, limit)).fetchall()
    return [dict(zip(ROW_COLUMNS, row, strict=True)) for row in rows]


def device(
    client: redis.Redis, settings: Settings, device_id: str, limit: int = 10, timeout: float = 3.0
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
