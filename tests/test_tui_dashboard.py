"""`tpx top` as an operator keeps it open: help that fits, honest sparklines, pause, times, palette.

Driven by Textual's Pilot with the keyboard, on canned data (tests/test_tui.py's CannedPoller) so
each screen is the same every time; the live tests in tests/test_tui.py use real services.
"""

from __future__ import annotations

import random

import pytest
import redis
from textual.geometry import Region
from textual.widget import Widget
from textual.widgets import Static

from tests.helpers import add_entries, record, xrange
from tests.test_tui import CannedPoller, cells, notices, select_row, selected, table, until
from tpx.config import Settings
from tpx.schema import migrate
from tpx.tui.app import TopApp
from tpx.tui.poller import LETTERS_SHOWN, Snapshot
from tpx.tui.screens import ConfirmScreen, DetailScreen, HelpScreen
from tpx.tui.sparkline import bars

#: A fix time in epoch microseconds, and the same instant as the detail view must show it.
LAST_TS_US = 1_796_105_228_604_000
LAST_TS_ISO = "2026-12-01T06:07:08.604Z"


class Wobbly(CannedPoller):
    """The canned data with a 190→199/s wobble in, nothing out, devices in a new order each poll."""

    polls = 0

    def poll(self) -> Snapshot:
        snap = super().poll()
        Wobbly.polls += 1
        random.Random(Wobbly.polls).shuffle(snap.devices)  # the instances answer in any order
        for d in snap.devices:
            d["last_ts_us"] = LAST_TS_US
        for letter in snap.letters:
            letter.at_ms = LAST_TS_US // 1000
        snap.in_history = (190.0, 199.0, 194.0, 196.0, 191.0, 199.0)
        snap.out_history = (0.0,)  # the first sample of an idle pipeline
        return snap


def app_for(settings: Settings, live: bool = True) -> TopApp:
    return TopApp(settings, poller=Wobbly(settings), interval=0.1, live=live, clock=False)


def line(widget: Widget) -> str:
    """The text a one-line widget shows on screen."""
    return widget.render_lines(Region(0, 0, widget.size.width, 1))[0].text


def footer_keys(app: TopApp) -> list[str]:
    return [str(key.render()).strip() for key in app.screen.query("FooterKey")]


async def test_help_rows_do_not_wrap(settings: Settings) -> None:
    app = app_for(settings, live=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await until(pilot, lambda: app.refreshes >= 1, what="first render")
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.pause()
        body = app.screen.query_one(Static)
        text = str(body.render())
        # as many lines on screen as the help has: none wrapped onto a second line
        assert body.size.height == len(text.splitlines()), (body.size, text)
        assert "pause refresh" in text and "command palette" in text


def test_bars_start_at_zero() -> None:
    assert set(bars([190, 199, 194, 192], 10)) <= {"▇", "█"}  # a wobble near the top reads as steady
    assert bars([0, 0, 0], 10) == "▁▁▁" and bars([0.0], 10) == "▁"  # idle: a baseline, never solid
    assert bars([0, 50, 100], 10) == "▁▅█"
    assert bars(list(range(30)), 4) == bars([26, 27, 28, 29], 4)  # the newest samples, one bar each


async def test_sparklines_have_a_zero_baseline(settings: Settings) -> None:
    app = app_for(settings, live=False)
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, lambda: app.refreshes >= 1, what="first render")
        await pilot.pause()
        spark_in, spark_out = (line(app.query_one(f"#{n}-spark", Widget)) for n in ("in", "out"))
        assert set(spark_in.strip()) <= {"▇", "█"}, spark_in  # 190..199/s: all near full height
        assert "█" not in spark_out and "▁" in spark_out, spark_out  # 0/s: a baseline


async def test_pause_keeps_the_rows_still(settings: Settings) -> None:
    app = app_for(settings)
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, lambda: app.refreshes >= 2, what="refreshes")
        await until(pilot, lambda: "p pause" in footer_keys(app), what="the key in the footer")
        await pilot.press("4")
        order = [r[0] for r in cells(app, "devices")]
        assert order == sorted(order)  # by id, whatever order the instances answered in
        await select_row(pilot, app, "devices", order[3])
        seen = app.refreshes
        await until(pilot, lambda: app.refreshes >= seen + 3, what="three more refreshes")
        assert [r[0] for r in cells(app, "devices")] == order and selected(app, "devices") == order[3]

        await pilot.press("p")
        assert "PAUSED" in app.sub_title
        frozen = app.refreshes
        await pilot.pause(0.6)  # six refresh intervals: none may render
        assert app.refreshes == frozen
        await pilot.press("p")
        assert "PAUSED" not in app.sub_title
        await until(pilot, lambda: app.refreshes >= frozen + 2, what="refreshing again")


async def test_detail_shows_times_not_epoch_numbers(settings: Settings) -> None:
    app = app_for(settings, live=False)
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, lambda: app.refreshes >= 1, what="first render")
        await pilot.press("3", "enter")
        await until(pilot, lambda: isinstance(app.screen, DetailScreen), what="letter detail")
        body = str(app.screen.query_one("#detail-body", Static).render())
        assert f'"at_ms": "{LAST_TS_ISO} ({LAST_TS_US // 1000})"' in body, body


async def test_palette_runs_tpx_actions(settings: Settings) -> None:
    app = app_for(settings)
    async with app.run_test(size=(120, 36), notifications=True) as pilot:
        await until(pilot, lambda: app.refreshes >= 1, what="first render")

        async def palette(*keys: str) -> None:
            await pilot.press("ctrl+p")
            await pilot.pause()
            await pilot.press(*keys)
            await pilot.pause(0.3)  # the palette searches in the background
            await pilot.press("enter")
            await pilot.pause()

        await palette(*"pause refresh")
        assert app.paused and "PAUSED" in app.sub_title
        await palette(*"show devices")
        assert app.query_one("#tabs").active == "tab-devices"  # type: ignore[attr-defined]
        await palette(*"replay dead letter")
        await until(pilot, lambda: "select a dead letter first" in notices(app), what="the notice")


class FailingWriters(CannedPoller):
    """The canned data, with instance tpx-a1's writers failing for 12 s."""

    def poll(self) -> Snapshot:
        snap = super().poll()
        assert snap.status is not None
        for consumer in snap.status.consumers:
            if consumer.instance is not None:
                consumer.instance.writers_failing = ["tpx-writer-1"]
                consumer.instance.writers_failing_detail = [
                    {"writer": "tpx-writer-1", "for_s": 12, "reason": 'UndefinedColumn: column "speed"'}
                ]
        return snap


async def test_failing_writers_are_in_the_banner_and_the_instances_table(settings: Settings) -> None:
    """An instance whose writers fail is not plain "alive": the banner up top and its row say so."""
    app = TopApp(settings, poller=FailingWriters(settings), interval=0.1, live=False, clock=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await until(pilot, lambda: app.refreshes >= 1, what="first render")
        banner = str(app.query_one("#banner", Static).render())
        assert "tpx-a1: WRITERS FAILING 12s: tpx-writer-1: UndefinedColumn" in banner, banner
        rows = {row[0]: row for row in cells(app, "instances")}
        assert rows["tpx-a1"][1].startswith("alive, WRITERS FAILING 12s"), rows["tpx-a1"]


def dead_letter(stage: str, n: int) -> dict[str, str]:
    """A dead letter as the engine adds one: the original fields, then the dlq_* ones."""
    return {
        **record(f"dev-{n % 7}", ts=1_796_105_228_604 + n),
        "dlq_stage": stage,
        "dlq_error": "record.lat out of range: 91" if stage == "decode" else "UntranslatableCharacter",
        "dlq_deliveries": "1",
        "dlq_consumer": "tpx-a1",
        "dlq_source_id": f"1796105228604-{n}",
        "dlq_at": "1796105228604",
    }


@pytest.mark.timeout(60)
async def test_replay_all_replays_every_dead_letter_not_only_the_rows_loaded(
    settings: Settings, rclient: redis.Redis
) -> None:
    """`R` said "replay all" and replayed the 100 rows the table loads; it now asks with the whole
    count, warns that decode-stage letters come straight back, and replays every one."""
    migrate(settings.database_url, settings.db_schema)
    decode, write = 12, LETTERS_SHOWN + 18  # more than the table loads, both stages
    add_entries(rclient, settings.dlq_stream, [dead_letter("decode", n) for n in range(decode)])
    add_entries(rclient, settings.dlq_stream, [dead_letter("write", decode + n) for n in range(write)])
    total = decode + write
    app = TopApp(settings, interval=0.3, clock=False)
    async with app.run_test(size=(120, 36), notifications=True) as pilot:
        await until(pilot, lambda: table(app, "letters").row_count == LETTERS_SHOWN, what="a full table")
        await pilot.press("3", "R")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
        question = " ".join(str(app.screen.query_one("#question", Static).render()).split())
        assert question.startswith(f"Replay all {total} dead letters onto {settings.stream}?"), question
        assert (
            f"would replay {decode} letters of the decode stage: nothing changed since it was "
            "dead-lettered; it comes straight back unless" in question
        ), question
        await pilot.press("y")
        await until(pilot, lambda: rclient.xlen(settings.dlq_stream) == 0, what="an empty DLQ")
        await until(pilot, lambda: f"replayed {total} of {total} dead letters" in notices(app), what="notice")
    replayed = xrange(rclient, settings.stream)
    assert len(replayed) == total
    assert {fields[b"replays"] for _, fields in replayed} == {b"1"}
    assert not any(key.startswith(b"dlq_") for _, fields in replayed for key in fields)


@pytest.mark.timeout(60)
async def test_replaying_one_decode_letter_warns_in_the_confirmation(
    settings: Settings, rclient: redis.Redis
) -> None:
    migrate(settings.database_url, settings.db_schema)
    (entry_id,) = add_entries(rclient, settings.dlq_stream, [dead_letter("decode", 0)])
    app = TopApp(settings, interval=0.3, clock=False)
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, lambda: table(app, "letters").row_count == 1, what="the letter")
        await pilot.press("3", "r")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
        question = " ".join(str(app.screen.query_one("#question", Static).render()).split())
        assert question.startswith(f"Replay dead letter {entry_id.decode()} onto {settings.stream}?")
        assert "would replay 1 letter of the decode stage: nothing changed" in question, question
        await pilot.press("n")
    assert rclient.xlen(settings.dlq_stream) == 1
