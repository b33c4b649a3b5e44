"""The group, as kafka-consumer-groups manages it: list streams and groups, move the group's
position with a count of what that re-reads or skips, prune stale consumers. Real Redis, the
real `tpx` with stdout to a pipe."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import redis

from tests.helpers import add_entries, record
from tests.test_ops_pipes import env, run
from tpx import keys
from tpx.config import Settings

__all__ = ["env"]  # the fixture


def answer(env: dict[str, str], *args: str) -> Any:
    done = run(env, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_groups_lists_streams_and_their_groups(
    settings: Settings, rclient: redis.Redis, env: dict[str, str]
) -> None:
    rclient.xgroup_create(settings.stream, settings.group, id="0", mkstream=True)
    add_entries(rclient, settings.stream, [record("g", ts=1_790_000_000_000 + i) for i in range(4)])
    rclient.xreadgroup(settings.group, "c1", {settings.stream: ">"}, count=1)
    rclient.set(settings.stream + ":not-a-stream", "x")
    prefix = settings.stream.split(":", 2)[1]
    try:
        listing = answer(env, "groups", "--match", f"test:{prefix}:*")
    finally:
        rclient.delete(settings.stream + ":not-a-stream")
    assert [s["stream"] for s in listing["streams"]] == [settings.stream] and not listing["truncated"]
    (group,) = listing["streams"][0]["groups"]
    assert group["name"] == settings.group and group["consumers"] == 1 and group["pending"] == 1
    out = run(env, "groups", "--match", f"test:{prefix}:*").stdout
    row = next(line for line in out.splitlines() if settings.stream in line)
    assert settings.group in row and " 4 " in row


def test_group_reset_counts_what_it_rereads_or_skips(
    settings: Settings, rclient: redis.Redis, env: dict[str, str]
) -> None:
    rclient.xgroup_create(settings.stream, settings.group, id="$", mkstream=True)
    base = 1_790_000_000_000
    for i in range(10):  # one entry per second of 2026-09-21
        rclient.xadd(settings.stream, dict(record("r", ts=base + i)), id=f"{base + i * 1000}-0")  # type: ignore[arg-type]
    rclient.xreadgroup(settings.group, "c1", {settings.stream: ">"}, count=10)
    rclient.xack(settings.stream, settings.group, *[f"{base + i * 1000}-0" for i in range(10)])

    when = dt.datetime.fromtimestamp((base + 6000) / 1000, dt.UTC).isoformat()
    dry = answer(env, "group", "reset", "--to-datetime", when, "--dry-run")
    assert dry["reread"] == 4 and dry["skipped"] == 0 and dry["new_id"] == f"{base + 5000}-0"
    info = {as_text(g["name"]): g for g in rclient.xinfo_groups(settings.stream)}
    assert info[settings.group]["last-delivered-id"] == f"{base + 9000}-0".encode()  # unchanged

    moved = answer(env, "group", "reset", "--to-datetime", when)
    assert moved["reread"] == 4
    again: Any = rclient.xreadgroup(settings.group, "c2", {settings.stream: ">"}, count=100)
    assert [e[0] for e in again[0][1]] == [f"{base + i * 1000}-0".encode() for i in range(6, 10)]

    assert answer(env, "group", "reset", "--to-earliest", "--dry-run")["reread"] == 10
    out = run(env, "group", "reset", "--to-latest", "--dry-run").stdout
    assert "0 entries" not in out and "no entries between the two positions" in out

    answer(env, "group", "reset", "--to-earliest")
    done = run(env, "group", "reset", "--to-latest")
    assert done.returncode == 0 and "10 entries are skipped: never written" in done.stdout

    done = run(env, "group", "reset", "--to-datetime", "yesterday")
    assert done.returncode == 2 and "not a time: 'yesterday'" in done.stderr
    done = run(env, "group", "reset")
    assert done.returncode == 2 and "give one of --to-datetime" in done.stderr


def test_group_prune_removes_only_dead_consumers_with_nothing_pending(
    settings: Settings, rclient: redis.Redis, env: dict[str, str]
) -> None:
    rclient.xgroup_create(settings.stream, settings.group, id="$", mkstream=True)
    add_entries(rclient, settings.stream, [record("p", ts=1_790_000_000_000)])
    rclient.xreadgroup(settings.group, "holds-one", {settings.stream: ">"}, count=1)
    for name in ("pod-a", "pod-b", "alive-1"):
        rclient.xgroup_createconsumer(settings.stream, settings.group, name)  # what a restarted pod left
    rclient.set(keys.heartbeat(settings.stream, "alive-1"), json.dumps({"consumer": "alive-1"}), ex=60)

    dry = answer(env, "group", "prune", "--dry-run")
    assert dry["removed"] == ["pod-a", "pod-b"] and dry["dry_run"]
    assert len(rclient.xinfo_consumers(settings.stream, settings.group)) == 4
    done = run(env, "group", "prune")
    assert done.returncode == 0 and "removed 2 consumers" in done.stdout and "pod-a, pod-b" in done.stdout
    left = sorted(as_text(c["name"]) for c in rclient.xinfo_consumers(settings.stream, settings.group))
    assert left == ["alive-1", "holds-one"]


def as_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
