"""`tpx top` driven by Textual's Pilot against real Redis and Postgres holding real data."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from textual.widgets import DataTable, Input, Static

from tests.helpers import add_entries, record, row_count, wait_for, xrange
from tests.proxy import Proxy, redis_target, redis_via
from tpx.config import Settings
from tpx.engine.service import Engine
from tpx.ops.dlq import DeadLetterView
from tpx.ops.inspect import ConsumerView, Instance, PendingEntry, Status
from tpx.schema import migrate
from tpx.tui.app import TopApp
from tpx.tui.poller import Poller, Snapshot
from tpx.tui.screens import ConfirmScreen, HelpScreen

pytestmark = pytest.mark.slow

DEVICES = [f"35630704244{i:04d}" for i in range(6)]


@contextlib.contextmanager
def engine(settings: Settings) -> Iterator[Engine]:
    hook = threading.excepthook
    e = Engine(settings)
    e.start()
    try:
        yield e
    finally:
        e.shutdown()
        threading.excepthook = hook


def populate(settings: Settings, client: redis.Redis) -> None:
    """Positions for 6 devices, 2 poison records, and a dead consumer holding 3 entries."""
    now = int(time.time() * 1000)
    add_entries(client, settings.stream, [record(d, ts=now - 60_000 + i) for i, d in enumerate(DEVICES * 5)])
    add_entries(
        client,
        settings.stream,
        [{"device_id": "bad one", "record": "{}"}, {"device_id": "x", "record": "[]"}],
    )


def strand(settings: Settings, client: redis.Redis) -> None:
    now = int(time.time() * 1000)
    pipe = client.pipeline(transaction=True)  # atomic: the running engine cannot read them first
    for i in range(3):
        pipe.xadd(settings.stream, record("ghost-dev", ts=now - 5000 + i))  # type: ignore[arg-type]
    pipe.xreadgroup(settings.group, "ghost", {settings.stream: ">"}, count=3)
    pipe.execute()


async def until(pilot: Any, cond: Callable[[], Any], timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await pilot.pause(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def table(app: TopApp, name: str) -> DataTable[Any]:
    return app.query_one(f"#{name}", DataTable)


def cells(app: TopApp, name: str) -> list[list[str]]:
    t = table(app, name)
    return [[str(c) for c in t.get_row_at(i)] for i in range(t.row_count)]


def headers(app: TopApp, name: str) -> list[str]:
    return [c.label.plain for c in table(app, name).ordered_columns]


def selected(app: TopApp, name: str) -> str | None:
    """The key of the row under the cursor."""
    t = table(app, name)
    return None if t.row_count == 0 else str(t.coordinate_to_cell_key(t.cursor_coordinate).row_key.value)


async def select_row(pilot: Any, app: TopApp, name: str, key: str) -> None:
    """Move the cursor onto the row ``key`` with the arrow keys, as a user does."""
    await pilot.press("ctrl+home")
    for _ in range(table(app, name).row_count):
        if selected(app, name) == key:
            return
        await pilot.press("down")
    assert selected(app, name) == key, f"no row {key!r} in {name}"


def notices(app: TopApp) -> str:
    """The notifications on screen (Textual's toasts), as the user reads them."""
    return "\n".join(str(toast.render()) for toast in app.screen.query("Toast"))


def column(app: TopApp, name: str, index: int) -> list[str]:
    return [row[index] for row in cells(app, name)]


async def click_header(pilot: Any, t: DataTable[Any], key: str) -> None:
    """Click the header of the column ``key`` the way a user does, with the mouse."""
    x = 0
    for col in t.ordered_columns:
        if col.key.value == key:
            await pilot.click(t, offset=(x + 1, 0))
            await pilot.pause()
            return
        x += col.get_render_width(t)
    raise AssertionError(f"no column {key!r}")


def panel(app: TopApp) -> str:
    return str(app.query_one("#stream-panel", Static).render())


@pytest.fixture
def live(settings: Settings, rclient: redis.Redis) -> Iterator[Engine]:
    s = settings.model_copy(update={"http_addr": "127.0.0.1:0"})
    populate(s, rclient)
    with engine(s) as e:
        wait_for(
            lambda: row_count(s.database_url, s.db_schema) == 30 and rclient.xlen(s.dlq_stream) == 2,
            what="30 rows and 2 dead letters",
        )
        strand(s, rclient)
        yield e


async def test_panels_show_the_pipeline(settings: Settings, rclient: redis.Redis, live: Engine) -> None:
    app = TopApp(settings, interval=0.3)
    async with app.run_test(size=(120, 36)) as pilot:
        await until(
            pilot,
            lambda: table(app, "devices").row_count == 6 and "DEAD, HAS PENDING: ghost" in panel(app),
            what="panels filled",
        )
        text = panel(app)
        assert f"{rclient.xlen(settings.stream):,} entries" in text
        assert "pending 3" in text and "2 dead letters" in text and "1 alive" in text
        rows = {r[0]: r for r in cells(app, "instances")}
        assert rows["ghost"][1] == "DEAD, HAS PENDING" and rows["ghost"][2] == "3"
        assert rows["test-consumer"][1] == "alive"
        assert len(cells(app, "letters")) == 2
        assert {r[1] for r in cells(app, "letters")} == {"decode"}
        assert len(cells(app, "pending")) == 3
        devices = {r[0]: r for r in cells(app, "devices")}
        assert set(devices) == set(DEVICES)
        assert devices[DEVICES[0]][7] == "5" and devices[DEVICES[0]][6] == "valid"


async def test_filter_and_sort(settings: Settings, live: Engine) -> None:
    app = TopApp(settings, interval=0.3)
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, lambda: table(app, "devices").row_count == 6, what="devices")
        await pilot.press("4", "slash")
        assert app.query_one("#filter", Input).has_focus
        await pilot.press(*DEVICES[3][-4:])
        await until(pilot, lambda: table(app, "devices").row_count == 1, what="filtered to one device")
        assert cells(app, "devices")[0][0] == DEVICES[3]
        await pilot.press("escape")
        await until(pilot, lambda: table(app, "devices").row_count == 6, what="filter cleared")
        # a click on a header sorts by that column; a second click reverses
        devices = table(app, "devices")
        await click_header(pilot, devices, "device")
        assert headers(app, "devices")[0] == "device ▲" and column(app, "devices", 0) == sorted(DEVICES)
        await click_header(pilot, devices, "device")
        assert headers(app, "devices")[0] == "device ▼"
        assert column(app, "devices", 0) == sorted(DEVICES, reverse=True)
        # each device's last fix is newer than the one before it (see populate)
        await click_header(pilot, devices, "last fix")
        assert headers(app, "devices")[:2] == ["device", "last fix ▲"]
        assert column(app, "devices", 0) == DEVICES


def strand_pending(settings: Settings, client: redis.Redis, shape: list[tuple[int, int]]) -> list[str]:
    """One entry per (idle ms, deliveries) pending under the dead consumer ``ghost``, in that order.

    XCLAIM ... IDLE ms RETRYCOUNT n is how Redis itself sets an entry's idle time and delivery count."""
    ids = [
        i.decode()
        for i in add_entries(client, settings.stream, [record(f"dev-{n}") for n in range(len(shape))])
    ]
    client.xgroup_create(settings.stream, settings.group, id="0")
    client.xreadgroup(settings.group, "ghost", {settings.stream: ">"}, count=len(shape))
    for entry_id, (idle_ms, deliveries) in zip(ids, shape, strict=True):
        client.xclaim(
            settings.stream,
            settings.group,
            "ghost",
            0,
            [entry_id],
            idle=idle_ms,
            retrycount=deliveries,
            justid=True,
        )
    return ids


async def test_sort_by_keys_orders_by_value_not_text(settings: Settings, rclient: redis.Redis) -> None:
    migrate(settings.database_url, settings.db_schema)
    # idle 10m, 4h05m, 5m and deliveries 10, 9, 2: as text "10m00s" < "4h05m" < "5m00s" and "10" < "2" < "9"
    # (minutes, so that the text order stays wrong while the test runs and the idle times grow)
    a, b, c = strand_pending(settings, rclient, [(600_000, 10), (14_700_000, 9), (300_000, 2)])
    app = TopApp(settings, interval=0.3)
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, lambda: table(app, "pending").row_count == 3, what="pending entries")
        pending = table(app, "pending")
        await pilot.press("2", "down")  # the cursor on b, the second oldest
        assert pending.has_focus and selected(app, "pending") == b
        await pilot.press("s", "s", "s")  # id, consumer, idle
        assert headers(app, "pending")[2] == "idle ▲"
        assert column(app, "pending", 0) == [c, a, b] and column(app, "pending", 2)[0].endswith("s")
        assert selected(app, "pending") == b  # the cursor moved with its row
        await pilot.press("S")
        assert headers(app, "pending")[2] == "idle ▼" and column(app, "pending", 0) == [b, a, c]
        await pilot.press("s")
        assert headers(app, "pending")[3] == "deliveries ▲" and column(app, "pending", 3) == ["2", "9", "10"]
        refreshes = app.refreshes
        await until(pilot, lambda: app.refreshes >= refreshes + 2, what="two refreshes")
        assert column(app, "pending", 0) == [c, b, a] and selected(app, "pending") == b
        # equal values keep the natural order (oldest first), reversed too
        await click_header(pilot, pending, "consumer")
        assert headers(app, "pending")[1] == "consumer ▲" and column(app, "pending", 0) == [a, b, c]
        await pilot.press("S")
        assert headers(app, "pending")[1] == "consumer ▼" and column(app, "pending", 0) == [a, b, c]
        # past the last column, s returns to the natural order
        await pilot.press("s", "s", "s", "s")
        assert "▲" not in "".join(headers(app, "pending")) and column(app, "pending", 0) == [a, b, c]
        # the keys are in the footer and the help says what they do
        footer = [str(key.render()).strip() for key in app.screen.query("FooterKey")]
        assert "s/S sort" in footer, footer
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        help_text = str(app.screen.query_one(Static).render())
        assert "sort by the next column" in help_text and "reverse the order" in help_text


async def test_replay_claim_and_rehydrate_actions(
    settings: Settings, rclient: redis.Redis, live: Engine
) -> None:
    app = TopApp(settings, interval=0.3)
    async with app.run_test(size=(120, 36), notifications=True) as pilot:
        await until(
            pilot,
            lambda: table(app, "letters").row_count == 2 and table(app, "devices").row_count == 6,
            what="data",
        )
        # replay the selected dead letter: it fails again and comes back with replays=1
        await pilot.press("3", "r")
        await pilot.pause()
        await pilot.press("y")
        await until(
            pilot, lambda: any(r[4] == "1" for r in cells(app, "letters")), what="replayed letter back"
        )

        # claim the dead consumer
        await pilot.press("1")
        await select_row(pilot, app, "instances", "ghost")
        await pilot.press("c")
        await pilot.pause()
        await pilot.press("y")
        await until(
            pilot,
            lambda: (
                b"ghost" not in {c["name"] for c in rclient.xinfo_consumers(settings.stream, settings.group)}
            ),
            what="ghost removed",
        )
        assert row_count(settings.database_url, settings.db_schema) == 33

        # rehydrate the selected device
        await pilot.press("4")
        device = selected(app, "devices")
        assert device is not None
        assert live.states.get(device) is not None
        await pilot.press("h")
        await pilot.pause()
        await pilot.press("y")
        await until(pilot, lambda: live.states.get(device) is None, what="state dropped")

        # an action that does not apply says so instead of doing anything
        await pilot.press("1")
        await select_row(pilot, app, "instances", "test-consumer")
        await pilot.press("c")
        await until(
            pilot,
            lambda: "test-consumer is alive: its entries are in flight, nothing to claim" in notices(app),
            what="the notice",
        )
        assert not isinstance(app.screen, ConfirmScreen) and len(app.screen_stack) == 1


async def test_cancelled_action_changes_nothing(
    settings: Settings, rclient: redis.Redis, live: Engine
) -> None:
    app = TopApp(settings, interval=0.3)
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, lambda: table(app, "letters").row_count == 2, what="letters")
        before = rclient.xlen(settings.dlq_stream)
        await pilot.press("3", "R")
        await pilot.pause()
        await pilot.press("n")
        await pilot.pause(0.5)
        assert rclient.xlen(settings.dlq_stream) == before
        assert {f.get(b"replays", b"0") for _, f in xrange(rclient, settings.dlq_stream)} == {b"0"}


async def test_works_with_no_instance_running(settings: Settings, rclient: redis.Redis) -> None:
    populate(settings, rclient)
    with engine(settings):
        wait_for(lambda: row_count(settings.database_url, settings.db_schema) == 30, what="rows")
    strand(settings, rclient)
    app = TopApp(settings, interval=0.3)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(
            pilot,
            lambda: table(app, "devices").row_count == 6 and table(app, "letters").row_count == 2,
            what="data without instances",
        )
        assert "0 alive" in panel(app)
        assert {r[10] for r in cells(app, "devices")} == {"positions"}  # the fallback source


async def test_banner_when_redis_is_unreachable(
    settings: Settings, rclient: redis.Redis, redis_server_url: str
) -> None:
    migrate(settings.database_url, settings.db_schema)
    populate(settings, rclient)
    rclient.xgroup_create(settings.stream, settings.group, id="0")
    proxy = Proxy(redis_target(redis_server_url))
    try:
        app = TopApp(
            settings.model_copy(update={"redis_url": redis_via(redis_server_url, proxy)}), interval=0.3
        )
        async with app.run_test(size=(80, 24)) as pilot:
            banner = app.query_one("#banner", Static)
            await until(pilot, lambda: "entries" in panel(app), what="first data")
            assert not banner.has_class("shown")
            proxy.cut()
            await until(pilot, lambda: banner.has_class("shown"), what="banner")
            assert "Redis unreachable" in str(banner.render())
            proxy.restore()
            await until(pilot, lambda: not banner.has_class("shown"), timeout=30, what="banner cleared")
    finally:
        proxy.close()


# --- snapshots -------------------------------------------------------------------------------------------


class CannedPoller(Poller):
    """Fixed data, so the screen renders the same every time (the live tests above use real services)."""

    def poll(self) -> Snapshot:
        now = time.time()
        st = Status(
            stream="telemetry:t",
            group="processor",
            stream_exists=True,
            stream_length=182_443,
            last_entry_id="1-0",
            last_entry_age_s=0.4,
            group_exists=True,
            lag=1_204,
            pending=2_310,
            oldest_pending_id="1-0",
            oldest_pending_age_s=95,
            dlq_length=17,
            at=now,
        )
        inst = Instance(
            "tpx-a1",
            host="node-1",
            pid=41,
            version="0.1.0",
            read_per_s=3_950,
            written_per_s=3_930,
            queue_depth=1,
            cache_size=4_812,
            e2e_p50_s=0.21,
            e2e_p95_s=0.48,
        )
        st.instances = [inst]
        st.consumers = [
            ConsumerView("tpx-a1", 2_000, 12, True, inst),
            ConsumerView("tpx-b7", 310, 98_000, False),
        ]
        letters = [
            DeadLetterView(
                f"17958800{i:05d}-0",
                f"17958799{i:05d}-0",
                "decode" if i % 3 else "write",
                "record.lat out of range -90..90: 91.5"
                if i % 3
                else "UntranslatableCharacter: unsupported Unicode escape sequence",
                1 + i % 3,
                "tpx-a1",
                0,
                f"3563070424{i:05d}",
                i % 2,
            )
            for i in range(6)
        ]
        devices = [
            {
                "device_id": f"3563070424{i:05d}",
                "last_ts_us": None,
                "latitude": 54.6872 + i / 100,
                "longitude": 25.2797 - i / 100,
                "speed": 40.5 + i,
                "valid": i != 2,
                "records": 100 + i,
                "duplicates": i,
                "out_of_order": i // 2,
                "consumer": "tpx-a1",
            }
            for i in range(8)
        ]
        pending = [PendingEntry(f"179587990{i:04d}-0", "tpx-b7", 98_000, 2, 95) for i in range(5)]
        return Snapshot(
            status=st,
            letters=letters,
            oldest_pending=pending,
            devices=devices,
            in_per_s=3_990,
            out_per_s=3_930,
            dlq_per_min=3,
            in_history=(3_800.0, 4_100.0, 3_950.0, 4_020.0, 3_990.0),
            out_history=(3_700.0, 4_000.0, 3_930.0, 4_010.0, 3_930.0),
        )


def canned_app(settings: Settings) -> TopApp:
    return TopApp(
        settings.model_copy(update={"stream": "telemetry:t"}),
        poller=CannedPoller(settings),
        live=False,
        clock=False,
    )


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_main_screen_snapshot(snap_compare: Any, settings: Settings, size: tuple[int, int]) -> None:
    async def settle(pilot: Any) -> None:
        await until(pilot, lambda: pilot.app.refreshes >= 1, what="first render")
        await pilot.pause()

    assert snap_compare(canned_app(settings), terminal_size=size, run_before=settle)
