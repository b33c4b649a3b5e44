"""An instance's recent warnings, carried by its heartbeat and shown by `tpx top` (as k9s shows a
pod's log): why its writers fail, without a shell on its host."""

from __future__ import annotations

import json
import logging
from typing import Any

import redis

from tests.helpers import row_count, wait_for
from tests.test_tui import engine, populate, select_row, table, until
from tpx import keys
from tpx.config import Settings
from tpx.logs import RECENT_LINE_CHARS, RECENT_WARNINGS, RecentWarnings
from tpx.schema import migrate
from tpx.tui.app import TopApp
from tpx.tui.screens import DetailScreen

#: A control message no instance can parse, quoting a URL with a password (it must not leak).
BAD_MESSAGE = b"reconnect postgresql://tpx:hunter2@db.internal/tpx please"


def heartbeat(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    raw = client.get(keys.heartbeat(settings.stream, settings.consumer))
    return {} if raw is None else dict(json.loads(raw))


def test_ring_keeps_the_last_lines_short_and_masked() -> None:
    ring = RecentWarnings()
    log = logging.getLogger("tpx.test.ring")
    log.addHandler(ring)
    log.propagate = False
    try:
        log.info("not kept: below WARNING")
        for i in range(RECENT_WARNINGS + 5):
            log.warning("writer %d failed: %s", i, "postgresql://tpx:hunter2@db/tpx")
        log.error("long %s", "x" * 1000)
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            log.exception("step failed")
    finally:
        log.removeHandler(ring)
    lines = ring.recent()
    assert len(lines) == RECENT_WARNINGS
    assert "writer 7 failed" in lines[0] and "hunter2" not in "".join(lines) and "tpx:***@db" in lines[0]
    assert len(lines[-2]) == RECENT_LINE_CHARS and lines[-2].endswith("…")
    assert lines[-1].endswith("step failed (ValueError: boom)") and "ERROR [MainThread]" in lines[-1]


async def test_instance_view_shows_its_recent_warnings(settings: Settings, rclient: redis.Redis) -> None:
    s = settings.model_copy(update={"http_addr": "127.0.0.1:0"})
    migrate(s.database_url, s.db_schema)
    populate(s, rclient)
    with engine(s):
        wait_for(lambda: row_count(s.database_url, s.db_schema) == 30, what="rows")
        rclient.publish(keys.control_channel(s.stream), BAD_MESSAGE)
        wait_for(
            lambda: any(
                "ignored a control message" in w for w in heartbeat(rclient, s).get("recent_warnings", [])
            ),
            timeout=keys.HEARTBEAT_INTERVAL_S * 3,
            what="the warning in the heartbeat",
        )
        app = TopApp(s, interval=0.3)
        async with app.run_test(size=(120, 36)) as pilot:
            await until(pilot, lambda: table(app, "instances").row_count >= 1, what="instances")
            await select_row(pilot, app, "instances", s.consumer)
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, DetailScreen), what="instance view")
            body = str(app.screen.query_one("#detail-body").render())
            assert f"{s.consumer}: alive" in body and "writers failing: none" in body
            assert "ignored a control message" in body and "tpx:***@db.internal" in body, body
            assert "hunter2" not in body
            await pilot.press("escape", "w")  # the same view by key
            await until(pilot, lambda: isinstance(app.screen, DetailScreen), what="instance view again")
