"""The consumer group, as kafka-consumer-groups manages it: list, move its position, prune.

``tpx groups`` lists the streams on a Redis (a bounded SCAN for keys of TYPE stream) and the
groups reading each; ``tpx group reset`` moves a group's position (XGROUP SETID) to the
earliest entry, the latest, or a time, saying how many entries that re-reads or skips (writes
are idempotent, so a re-read after a bad deploy is safe); ``tpx group prune`` removes every
consumer with no heartbeat and nothing pending, each checked and removed in one script.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast

import redis

from tpx.config import Settings
from tpx.errors import OpsError
from tpx.ops.inspect import instances
from tpx.streams import as_text, entry_ms, group_lag

#: Keys SCAN looks at per step when listing streams.
SCAN_COUNT: Final = 1000
#: Streams listed at most: a Redis holding more streams than this is not tpx's alone; narrow
#: the search with --match.
MAX_STREAMS: Final = 200
#: Entries per XRANGE page when counting what a reset re-reads or skips (ids only are used).
COUNT_PAGE: Final = 10_000
#: The id before every entry: a group set there re-reads the whole stream.
EARLIEST_ID: Final = "0-0"

#: KEYS[1] stream; ARGV[1] group, ARGV[2] consumer. Removes the consumer only if it holds no
#: pending entry at that moment (DELCONSUMER would drop its pending entries from the group).
_PRUNE_LUA = """
local held = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #held > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""


@dataclass
class GroupView:
    name: str
    consumers: int
    pending: int
    last_delivered_id: str
    lag: int | None


@dataclass
class StreamView:
    stream: str
    length: int
    groups: list[GroupView] = field(default_factory=list)


@dataclass
class Listing:
    streams: list[StreamView]
    #: True when more than MAX_STREAMS streams matched: the list is cut
    truncated: bool


def list_groups(client: redis.Redis, match: str = "*") -> Listing:
    """The streams whose key matches ``match`` and the groups on each, by stream name."""
    found: list[str] = []
    truncated = False
    for key in client.scan_iter(match=match, count=SCAN_COUNT, _type="stream"):
        if len(found) >= MAX_STREAMS:
            truncated = True
            break
        found.append(as_text(key))
    found.sort()
    pipe = client.pipeline(transaction=False)
    for key in found:
        pipe.xlen(key)
        pipe.xinfo_stream(key)
        pipe.xinfo_groups(key)
    answers = pipe.execute(raise_on_error=False) if found else []
    out = []
    for i, key in enumerate(found):
        length, info, groups = answers[3 * i : 3 * i + 3]
        if isinstance(length, Exception):  # deleted or replaced between SCAN and now
            continue
        view = StreamView(key, int(length))
        last = None if isinstance(info, Exception) else info.get("last-generated-id")
        for g in [] if isinstance(groups, Exception) else groups:
            view.groups.append(
                GroupView(
                    name=as_text(g["name"]),
                    consumers=int(g["consumers"]),
                    pending=int(g["pending"]),
                    last_delivered_id=as_text(g["last-delivered-id"]),
                    lag=group_lag(g, last, view.length),
                )
            )
        out.append(view)
    return Listing(out, truncated)


Target = Literal["earliest", "latest"] | dt.datetime


@dataclass
class ResetResult:
    stream: str
    group: str
    old_id: str
    new_id: str
    #: entries between the old and the new position that will be delivered again
    reread: int
    #: entries between the old and the new position that will never be delivered
    skipped: int
    dry_run: bool
    #: instances reading the group now (they go on from the new position at once)
    live: list[str] = field(default_factory=list)


def _group(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    if not client.exists(settings.stream):
        raise OpsError(f"stream {settings.stream} does not exist")
    for g in client.xinfo_groups(settings.stream):
        if as_text(g["name"]) == settings.group:
            return g
    raise OpsError(f"group {settings.group} does not exist on {settings.stream}")


def _position(client: redis.Redis, stream: str, target: Target) -> str:
    """The id to set the group at, so that its next read starts where ``target`` says."""
    if target == "earliest":
        return EARLIEST_ID
    if target == "latest":
        return as_text(client.xinfo_stream(stream)["last-generated-id"])
    ms = int(target.timestamp() * 1000)
    before = client.xrevrange(stream, max=f"({ms}-0", min="-", count=1)  # the newest entry before T
    return as_text(before[0][0]) if before else EARLIEST_ID


def _count_between(client: redis.Redis, stream: str, low: str, high: str) -> int:
    """Entries with ``low`` < id <= ``high``."""
    count = 0
    cursor = f"({low}"
    while True:
        page = client.xrange(stream, min=cursor, max=high, count=COUNT_PAGE) or []
        count += len(page)
        if len(page) < COUNT_PAGE:
            return count
        cursor = f"({as_text(page[-1][0])}"


def _key(entry_id: str) -> tuple[int, int]:
    return entry_ms(entry_id), int(entry_id.partition("-")[2] or 0)


def reset(client: redis.Redis, settings: Settings, target: Target, dry_run: bool = False) -> ResetResult:
    """Move the group so its next read starts at ``target``; pending entries are not touched."""
    s = settings
    old = as_text(_group(client, s)["last-delivered-id"])
    new = _position(client, s.stream, target)
    reread = skipped = 0
    if _key(new) < _key(old):
        reread = _count_between(client, s.stream, new, old)
    elif _key(new) > _key(old):
        skipped = _count_between(client, s.stream, old, new)
    if not dry_run:
        client.xgroup_setid(s.stream, s.group, new)
    live = [i.consumer for i in instances(client, s.stream)]
    return ResetResult(s.stream, s.group, old, new, reread, skipped, dry_run, live)


@dataclass
class PruneResult:
    removed: list[str]
    #: consumers that read an entry between the look and the removal: kept
    kept: list[str]
    dry_run: bool


def prune(client: redis.Redis, settings: Settings, dry_run: bool = False) -> PruneResult:
    """Remove every consumer with no heartbeat and no pending entries (stale pod names)."""
    s = settings
    _group(client, s)
    alive = {i.consumer for i in instances(client, s.stream)}
    idle = [
        as_text(c["name"])
        for c in client.xinfo_consumers(s.stream, s.group)
        if int(c["pending"]) == 0 and as_text(c["name"]) not in alive
    ]
    if dry_run:
        return PruneResult(sorted(idle), [], True)
    script = client.register_script(_PRUNE_LUA)
    removed: list[str] = []
    kept: list[str] = []
    for name in sorted(idle):
        outcome = int(cast(int, script(keys=[s.stream], args=[s.group, name])))
        (kept if outcome < 0 else removed).append(name)
    return PruneResult(removed, kept, False)
