"""`tpx top`'s timing tab and the device detail's membership, driven by Textual's Pilot against real
Redis and PostgreSQL: the CMS's tables from the demo's DDL (tpx/course.py), timing records inserted
as tpx writes them, membership written by a real engine's domain stage."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from psycopg import sql
from textual.widgets import Static

from tests.helpers import add_entries, drained, record, wait_for
from tests.proxy import Proxy, postgres_target, postgres_via
from tests.test_domain_stage import running
from tests.test_tui import cells, engine, headers, panel, select_row, table, until
from tpx.config import Settings
from tpx.connections import PG_CONNECT_TIMEOUT_S
from tpx.course import AREA, COURSE, create_course
from tpx.schema import migrate
from tpx.tui.app import TopApp
from tpx.tui.poller import Poller
from tpx.tui.screens import DetailScreen, HelpScreen

pytestmark = pytest.mark.slow

NAMES = {g.id: g.name for g in COURSE}
#: A winter day: Vilnius is UTC+2 (EET), so a local time is not the UTC one.
DAY = dt.datetime(2026, 1, 15, 10, 0, tzinfo=dt.UTC)


@pytest.fixture
def vilnius() -> Iterator[None]:
    """This process in Europe/Vilnius, so that local times differ from UTC."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Vilnius"
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


def insert_records(settings: Settings, rows: list[tuple[str, int, str, dt.datetime]]) -> list[str]:
    """Timing records (device, geofence id, event, time) as tpx writes them; their ids."""
    ids = [str(uuid.uuid4()) for _ in rows]
    table_name = sql.Identifier(settings.db_schema, "timing_records")
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        for rid, (device, geofence, event, ts) in zip(ids, rows, strict=True):
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (id, device_id, geofence, event, ts, latitude, longitude, speed,"
                    " direction, date_created) VALUES (%s, %s, %s, %s, %s, 54.6872, 25.2797, 36, %s, now())"
                ).format(table_name),
                (rid, device, geofence, event, ts, 1 if event == "cross" else None),
            )
    return ids


def tab_note(app: TopApp, tab: str = "timing") -> str:
    note = app.query_one(f"#{tab}-note", Static)
    return str(note.render()) if note.has_class("shown") else ""


async def test_the_timing_tab_lists_the_newest_records_first(settings: Settings, vilnius: None) -> None:
    migrate(settings.database_url, settings.db_schema)
    create_course(settings)
    # inserted out of time order: the tab orders by the event's time, newest first
    insert_records(
        settings,
        [
            ("dev-a", 1, "exit", DAY + dt.timedelta(seconds=30, milliseconds=250)),
            ("dev-b", 3, "cross", DAY + dt.timedelta(seconds=45)),
            ("dev-a", 1, "enter", DAY),
        ],
    )
    app = TopApp(settings, interval=0.3)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("5")
        await until(pilot, lambda: table(app, "timing").row_count == 3, what="three timing records")
        assert app.query_one("#tabs").active == "tab-timing"  # type: ignore[attr-defined]
        assert headers(app, "timing")[:4] == ["time (EET)", "device", "geofence", "event"]
        assert [r[:5] for r in cells(app, "timing")] == [
            ["01-15 12:00:45.000", "dev-b", NAMES[3], "cross", "L→R"],
            ["01-15 12:00:30.250", "dev-a", NAMES[1], "exit", "-"],
            ["01-15 12:00:00.000", "dev-a", NAMES[1], "enter", "-"],
        ]
        assert tab_note(app) == ""
        # every tab's overview says when the newest record came, and what it was
        assert "timing newest " in panel(app) and f"ago (cross {NAMES[3]})" in panel(app), panel(app)
        # the poller refreshes the tab: a newer record comes in on top
        insert_records(settings, [("dev-c", 4, "enter", DAY + dt.timedelta(minutes=5))])
        await until(pilot, lambda: table(app, "timing").row_count == 4, what="the new record")
        assert cells(app, "timing")[0][:4] == ["01-15 12:05:00.000", "dev-c", NAMES[4], "enter"]
        # the help lists the tab's key and what Enter does there
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        text = str(app.screen.query_one("#help-body", Static).render())
        assert "devices, timing" in text and "Enter on timing" in text


def drive(
    device: str, start_ms: int, east_from: float, east_to: float, step_m: float = 50
) -> list[dict[str, str]]:
    """Fixes every 5 s from ``east_from`` to ``east_to`` metres east of the course's centre."""
    out = []
    steps = round(abs(east_to - east_from) / step_m)
    for i in range(steps + 1):
        lat, lon = AREA.at(east_from + (east_to - east_from) * i / steps, 0)
        out.append(record(device, ts=start_ms + i * 5000, lat=round(lat, 7), lon=round(lon, 7), speed=36.0))
    return out


@pytest.mark.timeout(90)
async def test_the_device_detail_shows_its_membership_and_records(
    settings: Settings, rclient: redis.Redis, vilnius: None
) -> None:
    s = settings.model_copy(update={"domain": "on"})
    create_course(s)
    start_ms = int(time.time() * 1000) - 600_000
    # into the depot and parked there; the other device crosses the main road's gate
    parked = drive("dev-parked", start_ms, -400, 0)
    passing = drive("dev-passing", start_ms, -600, -300)
    add_entries(rclient, s.stream, parked + passing)
    with running(s):
        wait_for(lambda: drained(rclient, s, len(parked) + len(passing)), what="every record written")
        app = TopApp(s, interval=0.3)
        async with app.run_test(size=(120, 36)) as pilot:
            await pilot.press("5")
            await until(pilot, lambda: table(app, "timing").row_count == 2, what="the two records")
            rows = {r[1]: r for r in cells(app, "timing")}
            assert rows["dev-parked"][2:4] == [NAMES[1], "enter"]
            # eastward across a gate drawn south to north: from its left to its right
            assert rows["dev-passing"][2:5] == [NAMES[3], "cross", "L→R"]
            # newest first: the depot's enter (25 s in) before the gate's cross (15 s in)
            assert [r[1] for r in cells(app, "timing")] == ["dev-parked", "dev-passing"]
            await pilot.press("enter")  # the cursor is on the first row
            await until(pilot, lambda: isinstance(app.screen, DetailScreen), what="the device detail")
            body = detail_body(app)
            assert f"geofences inside now: {NAMES[1]}" in body, body
            assert "timing records (newest first, EET):" in body, body
            assert f"  {rows['dev-parked'][0]}  enter  {NAMES[1]}" in body, body  # the tab's local time
            await pilot.press("escape")
            # the other device, from the devices tab (the instance's cache): inside nothing now
            await pilot.press("4")
            await until(pilot, lambda: table(app, "devices").row_count == 2, what="the devices")
            await select_row(pilot, app, "devices", "dev-passing")
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, DetailScreen), what="the other device")
            body = detail_body(app)
            assert "geofences inside now: none" in body, body
            assert f"cross  {NAMES[3]}" in body, body


def detail_body(app: TopApp) -> str:
    return str(app.screen.query_one("#detail-body", Static).render())


async def test_without_the_tables_the_tab_says_domain_off(settings: Settings) -> None:
    migrate(settings.database_url, settings.db_schema)
    app = TopApp(settings, interval=0.3)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("5")
        await until(pilot, lambda: tab_note(app) != "", what="the note")
        assert tab_note(app) == "domain off: table geofences not found (TPX_GEOFENCES_TABLE)"
        assert table(app, "timing").row_count == 0
        assert "timing: domain off (tab 5 says why)" in panel(app)
    off = TopApp(settings.model_copy(update={"domain": "off"}), interval=0.3)
    async with off.run_test(size=(80, 24)) as pilot:
        await pilot.press("5")
        await until(pilot, lambda: tab_note(off) != "", what="the note")
        assert tab_note(off) == "domain off: TPX_DOMAIN=off"


@pytest.mark.parametrize("instance", [False, True], ids=["no-instance", "an-instance"])
async def test_a_database_that_refuses_is_one_line_and_the_app_keeps_running(
    settings: Settings, rclient: redis.Redis, pg_server_url: str, instance: bool
) -> None:
    """Without an instance the device fallback meets the refusal first (the timing query then
    waits for no second timeout); with one, the devices come from its cache and the timing query
    meets it itself. Either way: one line in the tab, and the dashboard goes on refreshing."""
    migrate(settings.database_url, settings.db_schema)
    create_course(settings)
    insert_records(settings, [("dev-a", 2, "enter", DAY)])
    proxy = Proxy(postgres_target(pg_server_url))
    with contextlib.ExitStack() as stack:
        stack.callback(proxy.close)
        if instance:  # the engine writes to the database directly: only the dashboard's is cut
            stack.enter_context(engine(settings.model_copy(update={"http_addr": "127.0.0.1:0"})))
            add_entries(rclient, settings.stream, [record("dev-a")])
            wait_for(lambda: drained(rclient, settings, 1), what="the instance's device")
        app = TopApp(
            settings.model_copy(update={"database_url": postgres_via(settings.database_url, proxy)}),
            interval=0.3,
        )
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("5")
            await until(pilot, lambda: table(app, "timing").row_count == 1, what="the record")
            assert app.snapshot.devices_from == ("instances" if instance else "positions")
            proxy.cut()
            await until(pilot, lambda: tab_note(app) != "", what="the note")
            note = tab_note(app)
            assert note.startswith("timing records unavailable: ") and note.endswith(" — retrying"), note
            assert "\n" not in note and "Traceback" not in note
            banner = app.query_one("#banner", Static)
            assert banner.has_class("shown") and "PostgreSQL unreachable" in str(banner.render())
            seen = app.refreshes
            await until(pilot, lambda: app.refreshes >= seen + 2, what="still refreshing")
            assert app.is_running and table(app, "timing").row_count == 0
            proxy.restore()
            await until(pilot, lambda: table(app, "timing").row_count == 1, timeout=30, what="back")
            assert tab_note(app) == ""


@pytest.mark.timeout(60)
def test_a_database_that_does_not_answer_costs_one_timeout_per_poll(settings: Settings) -> None:
    """A server that takes the connection and never answers: the device fallback waits its
    connect timeout, and the timing query does not wait a second one in the same poll."""
    migrate(settings.database_url, settings.db_schema)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever answers
        port = silent.getsockname()[1]
        poller = Poller(settings.model_copy(update={"database_url": f"postgresql://x@127.0.0.1:{port}/x"}))
        started = time.monotonic()
        snap = poller.poll()
        spent = time.monotonic() - started
    assert snap.status is not None and snap.postgres_error is not None
    assert snap.timing_error == snap.postgres_error and snap.timing == []
    assert PG_CONNECT_TIMEOUT_S * 0.8 < spent < PG_CONNECT_TIMEOUT_S * 1.6, spent


async def test_the_timing_queries_run_in_worker_threads(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never on the UI thread: the tab's query (the poller) nor the device detail's."""
    from tpx.ops import timing
    from tpx.tui import poller as poller_module

    migrate(settings.database_url, settings.db_schema)
    create_course(settings)
    insert_records(settings, [("dev-a", 1, "enter", DAY)])
    calls: list[tuple[str, threading.Thread]] = []

    def spy(real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append((real.__name__, threading.current_thread()))
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(poller_module, "latest_records", spy(timing.latest_records))
    monkeypatch.setattr(poller_module, "device_timing", spy(timing.device_timing))
    app = TopApp(settings, interval=0.3)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("5")
        await until(pilot, lambda: table(app, "timing").row_count == 1, what="the record")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DetailScreen), what="the device detail")
    assert {name for name, _ in calls} == {"latest_records", "device_timing"}
    assert all(thread is not threading.main_thread() for _, thread in calls), calls


def test_direction_labels() -> None:
    from tpx.tui.tables.timing import direction_label

    assert [direction_label(d) for d in (1, -1, None)] == ["L→R", "R→L", "-"]
