"""Simulated data starts at now: `tpx demo`'s devices read seconds old in `tpx top`, not an hour
(or, for `tpx simulate`, a day), and their fixes keep to the wall clock instead of running ahead."""

from __future__ import annotations

import threading
import time

import pytest

from tests.test_tui import cells, table, until
from tpx.config import Settings
from tpx.demo import Demo
from tpx.simulate import paced_interval_ms, start_ms
from tpx.tui.app import TopApp

pytestmark = pytest.mark.slow

#: The demo's fleet for this test: 20 devices at 200 records/s, one fix per device every 100 ms.
DEVICES, RATE = 20, 200.0
#: Seconds of age a device may show: refreshes and commits in between, never minutes.
FRESH_S = 10


def test_start_is_now_unless_asked() -> None:
    now = 1_796_105_228_604
    assert start_ms(None, now) == now and start_ms("", now) == now
    assert start_ms("-1h", now) == now - 3_600_000 and start_ms("-1d12h", now) == now - 129_600_000
    assert start_ms("2026-12-01T09:00:00Z", now) == 1_796_115_600_000
    assert start_ms("2026-12-01T09:00:00", now) == 1_796_115_600_000  # no zone: UTC
    assert start_ms("1700000000000", now) == 1_700_000_000_000
    with pytest.raises(ValueError, match="not a start time: 'yesterday'"):
        start_ms("yesterday", now)
    assert paced_interval_ms(200, 1000) == 200 and paced_interval_ms(100, None) == 1000


async def test_demo_devices_read_seconds_old(settings: Settings) -> None:
    s = settings.model_copy(update={"http_addr": "127.0.0.1:0"})
    hook = threading.excepthook
    demo = Demo(s, rate=RATE, devices=DEVICES, poison=0.0)
    demo.start()
    try:
        app = TopApp(s, interval=0.3)
        async with app.run_test(size=(160, 48)) as pilot:
            await until(pilot, lambda: table(app, "devices").row_count == DEVICES, what="every device")
            await pilot.pause(1.0)  # a second of simulated fixes: they must not run ahead of the clock
            await until(pilot, lambda: app.refreshes >= 2, what="a refresh")
            ages = [row[2] for row in cells(app, "devices")]
            assert all(age.endswith("s") and "m" not in age and int(age[:-1]) <= FRESH_S for age in ages), (
                ages
            )
            newest_us = max(d["last_ts_us"] for d in app.snapshot.devices)
            assert newest_us / 1e6 <= time.time() + 1, "fixes ahead of the wall clock"
    finally:
        demo.stop()
        threading.excepthook = hook
