"""Dead letters an operator can finish: delete by id, purge by filter, the reasons on their own,
a warning when decode-stage letters are replayed unchanged; pending entries with their device and
the database's last refusal. Real `tpx serve`, real dead letters, output through a pipe."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from tests import test_ops
from tests.helpers import Serve, add_entries, record, wait_for
from tests.test_ops_pipes import run
from tpx.config import Settings

pytestmark = pytest.mark.slow
#: the fixtures of the ops tests: the environment of `tpx` commands, and a running `tpx serve`
env = test_ops.env
serve = test_ops.serve


def answer(env: dict[str, str], *args: str) -> Any:
    done = run(env, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def poison(rclient: redis.Redis, settings: Settings) -> None:
    now = int(time.time() * 1000)
    add_entries(
        rclient,
        settings.stream,
        [
            {"device_id": "dev-a", "record": json.dumps({"ts": now, "lat": 95, "lon": 1})},
            {"device_id": "dev-b", "record": json.dumps({"ts": now, "lat": 99, "lon": 2})},
            {"device_id": "dev-b", "record": "not json"},
        ],
    )
    wait_for(lambda: rclient.xlen(settings.dlq_stream) == 3, what="3 dead letters")


def test_delete_purge_by_filter_and_reasons(
    settings: Settings, rclient: redis.Redis, serve: Serve, env: dict[str, str]
) -> None:
    poison(rclient, settings)
    reasons = answer(env, "dlq", "reasons")
    assert reasons[0] == {"stage": "decode", "reason": "record.lat out of range -90..90: …", "count": 2}
    assert sum(r["count"] for r in reasons) == 3
    out = run(env, "dlq", "reasons").stdout
    assert "record.lat out of range" in out and "dry run" not in out

    done = run(env, "dlq", "list", "--stage", "foo")
    assert done.returncode == 2 and "'foo' is not a stage" in done.stderr

    dry = answer(env, "dlq", "purge", "--reason", "out of range", "--device", "dev-b", "--dry-run")
    assert dry["removed"] == 1 and dry["dry_run"] and rclient.xlen(settings.dlq_stream) == 3
    assert answer(env, "dlq", "purge", "--reason", "out of range", "--device", "dev-b")["removed"] == 1
    left = {x["device_id"] for x in answer(env, "dlq", "list")}
    assert left == {"dev-a", "dev-b"} and rclient.xlen(settings.dlq_stream) == 2
    done = run(env, "dlq", "purge")
    assert done.returncode == 2 and "give --older-than, --stage" in done.stderr

    ids = [x["id"] for x in answer(env, "dlq", "list")]
    assert answer(env, "dlq", "delete", ids[0], "--dry-run")["deleted"] == [ids[0]]
    assert rclient.xlen(settings.dlq_stream) == 2
    done = run(env, "dlq", "delete", ids[0], "1-1")
    assert done.returncode == 1 and "deleted 1 dead letters" in done.stdout and "1-1" in done.stdout
    assert [x["id"] for x in answer(env, "dlq", "list")] == ids[1:]
    assert answer(env, "dlq", "purge", "--stage", "decode")["removed"] == 1
    assert rclient.xlen(settings.dlq_stream) == 0


def test_replaying_decode_letters_warns_that_nothing_changed(
    settings: Settings, rclient: redis.Redis, serve: Serve, env: dict[str, str]
) -> None:
    poison(rclient, settings)
    dry = answer(env, "dlq", "replay", "--all", "--dry-run")
    assert all(r["stage"] == "decode" and "nothing changed" in r["warning"] for r in dry)
    done = run(env, "dlq", "replay", "--all")
    assert done.returncode == 0
    assert "warning: replayed 3 letters of the decode stage: nothing changed" in done.stdout


def test_pending_shows_device_and_the_last_refusal(
    settings: Settings, rclient: redis.Redis, serve: Serve, env: dict[str, str]
) -> None:
    """A row the database refuses stays pending until TPX_MAX_DELIVERIES (3): `tpx pending`
    says whose it is and why, without grepping the logs."""
    add_entries(
        rclient, settings.stream, [record("dev-nul", ts=int(time.time() * 1000), io={"s": "nul\u0000"})]
    )
    wait_for(lambda: any(r["last_error"] for r in answer(env, "pending")), what="a refusal recorded")
    (entry,) = answer(env, "pending")
    assert entry["device_id"] == "dev-nul" and "UntranslatableCharacter" in entry["last_error"]
    out = run(env, "pending").stdout
    row = next(line for line in out.splitlines() if "dev-nul" in line)
    assert "UntranslatableCharacter" in row
