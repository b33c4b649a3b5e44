"""The CMS's tables as the domain stage finds and reads them, against a real PostgreSQL.

The tables come from deploy/directus/no-postgis.sql (jsonb geometry), created in the test's own
schema, and for PostGIS from the same DDL with a ``geometry(Geometry,4326)`` column in a fresh
database (skipped, naming why, where the server has no PostGIS). Covered: finding and checking
the tables (`inspect_tables`, `decide`), reading geofences (`load_geofences`), reloading them
(`GeofenceSource`), and `tpx geofences`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import psycopg
import psycopg.conninfo
import pytest
from psycopg import sql
from typer.testing import CliRunner

from tests.directus import NO_POSTGIS_DDL, fresh_database, postgis_unavailable
from tests.proxy import Proxy, postgres_via
from tpx import exitcodes
from tpx.cli import app
from tpx.config import Settings
from tpx.connections import pg_connect, search_path
from tpx.domain import GeofenceSet
from tpx.domainstage.geofences import GeofenceSource, load_geofences
from tpx.domainstage.tables import CmsTables, TablesMissing, decide, inspect_tables

pytestmark = pytest.mark.timeout(60)

JSON_DDL = NO_POSTGIS_DDL.read_text()
_JSON_COLUMN = "geometry      jsonb NOT NULL"
assert JSON_DDL.count(_JSON_COLUMN) == 1, "no-postgis.sql changed: update the PostGIS variant here"
#: The same tables with the column `directus schema apply` creates for a geometry field.
POSTGIS_DDL = JSON_DDL.replace(_JSON_COLUMN, "geometry      geometry(Geometry,4326) NOT NULL")
ALL_TIMING_COLUMNS = frozenset(
    {"id", "device_id", "geofence", "event", "ts", "latitude", "longitude"}
    | {"speed", "direction", "uncertainty_s", "date_created"}
)

# --- geofences: valid, inactive, and the four invalid kinds of issue 16 (lon, lat) ---
SQUARE = {
    "type": "Polygon",
    "coordinates": [[[25.0, 54.0], [25.01, 54.0], [25.01, 54.01], [25.0, 54.01], [25.0, 54.0]]],
}
SMALLER_SQUARE = {
    "type": "Polygon",
    "coordinates": [[[25.0, 54.0], [25.005, 54.0], [25.005, 54.005], [25.0, 54.005], [25.0, 54.0]]],
}
BOWTIE = {
    "type": "Polygon",
    "coordinates": [[[25.0, 54.0], [25.01, 54.01], [25.01, 54.0], [25.0, 54.01], [25.0, 54.0]]],
}
LINE = {"type": "LineString", "coordinates": [[25.0, 54.0], [25.0, 54.01]]}
ONE_POINT = {"type": "LineString", "coordinates": [[25.0, 54.0]]}
POINT = {"type": "Point", "coordinates": [25.0, 54.0]}

#: name -> (kind, geometry, radius_m, active)
FENCES: dict[str, tuple[str, dict[str, Any], float | None, bool]] = {
    "start": ("zone", SQUARE, None, True),
    "finish": ("gate", LINE, None, True),
    "pit": ("circle", POINT, 50.0, True),
    "closed": ("zone", SQUARE, None, False),
    "bowtie": ("zone", BOWTIE, None, True),
    "stub": ("gate", ONE_POINT, None, True),
    "no-radius": ("circle", POINT, None, True),
    "wrong-type": ("gate", SQUARE, None, True),
}
LOADED = {"start", "finish", "pit"}
INVALID_REASONS = {
    "bowtie": "invalid polygon: Self-intersection[25.005 54.005]",
    "stub": "a gate needs two distinct points, got 1 position(s)",
    "no-radius": "radius_m is missing",
    "wrong-type": "a gate needs a LineString geometry, got 'Polygon'",
}

runner = CliRunner()


def connect(settings: Settings) -> psycopg.Connection[Any]:
    """A connection as tpx makes one: its search_path is tpx's schema, then public."""
    conn = pg_connect(settings.database_url, "test-domain-tables", autocommit=True)
    conn.execute(search_path(settings))
    return conn


def create_cms(url: str, schema: str, ddl: str = JSON_DDL) -> None:
    """The CMS's two tables in ``schema`` (created if missing)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(schema)))
        conn.execute(ddl.encode())


def insert(conn: psycopg.Connection[Any], fence: str, postgis: bool = False, **columns: Any) -> Any:
    """The geofence ``fence`` of :data:`FENCES` (``columns`` override its values); returns its id."""
    kind, geometry, radius, active = FENCES[fence]
    values = {"name": fence, "kind": kind, "geometry": geometry, "radius_m": radius, "active": active}
    values.update(columns)
    values["geometry"] = json.dumps(values["geometry"])
    shape = sql.SQL("ST_SetSRID(ST_GeomFromGeoJSON(%(geometry)s), 4326)" if postgis else "%(geometry)s")
    row = conn.execute(
        sql.SQL(
            "INSERT INTO geofences (name, kind, geometry, radius_m, active)"
            " VALUES (%(name)s, %(kind)s, {}, %(radius_m)s, %(active)s) RETURNING id"
        ).format(shape),
        values,
    ).fetchone()
    assert row is not None
    return row[0]


def insert_all(conn: psycopg.Connection[Any], postgis: bool = False) -> dict[str, Any]:
    """Every geofence of :data:`FENCES`; returns name -> id."""
    return {name: insert(conn, name, postgis) for name in FENCES}


def by_name(fences: GeofenceSet, ids: dict[str, Any]) -> tuple[set[str], dict[str, str]]:
    """(the loaded geofences' names, invalid name -> reason)."""
    names = {gid: name for name, gid in ids.items()}
    return {names[g] for g in fences.by_id}, {names[i.id]: i.reason for i in fences.invalid}


@pytest.fixture
def cms(pg_server_url: str, schema: str) -> Settings:
    """Settings whose tpx schema holds the CMS's tables (no-postgis.sql)."""
    create_cms(pg_server_url, schema)
    return Settings(database_url=pg_server_url, db_schema=schema)


@pytest.fixture
def conn(cms: Settings) -> Iterator[psycopg.Connection[Any]]:
    with connect(cms) as c:
        yield c


@pytest.fixture
def tables(conn: psycopg.Connection[Any], cms: Settings) -> CmsTables:
    return inspect_tables(conn, cms)


# --- finding and checking the tables ------------------------------------------------------------


def test_the_no_postgis_tables_are_found_with_all_their_columns(
    conn: psycopg.Connection[Any], cms: Settings
) -> None:
    tables = inspect_tables(conn, cms)
    assert tables.geofences == "geofences" and tables.timing == "timing_records"
    assert tables.geometry == "json"
    assert tables.geofence_id_type == "integer"
    assert tables.timing_columns == ALL_TIMING_COLUMNS
    assert {"exit_margin_m", "date_updated"} <= tables.geofence_columns
    assert tables.geofences_ident().as_string(conn) == '"geofences"'


def test_optional_columns_may_be_missing_and_are_recorded(
    conn: psycopg.Connection[Any], cms: Settings
) -> None:
    conn.execute("ALTER TABLE timing_records DROP COLUMN direction, DROP COLUMN uncertainty_s")
    conn.execute("ALTER TABLE geofences DROP COLUMN exit_margin_m, DROP COLUMN date_updated")
    tables = inspect_tables(conn, cms)
    assert tables.timing_columns == ALL_TIMING_COLUMNS - {"direction", "uncertainty_s"}
    assert not {"exit_margin_m", "date_updated"} & tables.geofence_columns
    gid = insert(conn, "start")
    [start] = load_geofences(conn, tables).by_id.values()
    assert (start.id, start.exit_margin_m, start.date_updated) == (gid, 0.0, None)


@pytest.mark.parametrize(("setting", "env"), [("geofences_table", "GEOFENCES"), ("timing_table", "TIMING")])
def test_a_missing_table_is_named_with_its_setting(
    conn: psycopg.Connection[Any], cms: Settings, schema: str, setting: str, env: str
) -> None:
    name = f"{schema}.nosuch"  # qualified: a table of that name in public cannot hide the miss
    with pytest.raises(TablesMissing) as caught:
        inspect_tables(conn, cms.model_copy(update={setting: name}))
    assert str(caught.value) == f"table {name} not found (TPX_{env}_TABLE)"


def test_an_unqualified_table_is_looked_for_in_the_tpx_schema(
    conn: psycopg.Connection[Any], cms: Settings
) -> None:
    conn.execute("DROP TABLE timing_records")
    with pytest.raises(TablesMissing, match=r"^table timing_records not found \(TPX_TIMING_TABLE\)$"):
        inspect_tables(conn, cms)


@pytest.mark.parametrize(
    ("table", "drop", "message"),
    [
        ("timing_records", ["ts"], "timing_records has no column ts"),
        ("timing_records", ["ts", "event"], "timing_records has no columns event, ts"),
        ("geofences", ["kind"], "geofences has no column kind"),
        ("geofences", ["radius_m"], "geofences has no column radius_m"),
    ],
)
def test_a_missing_column_is_named(
    conn: psycopg.Connection[Any], cms: Settings, table: str, drop: list[str], message: str
) -> None:
    conn.execute(
        sql.SQL("ALTER TABLE {} {}").format(
            sql.Identifier(table),
            sql.SQL(", ").join(sql.SQL("DROP COLUMN {}").format(sql.Identifier(c)) for c in drop),
        )
    )
    with pytest.raises(TablesMissing) as caught:
        inspect_tables(conn, cms)
    assert str(caught.value) == message


def test_an_index_is_not_a_table(conn: psycopg.Connection[Any], cms: Settings) -> None:
    with pytest.raises(TablesMissing) as caught:
        inspect_tables(conn, cms.model_copy(update={"geofences_table": "geofences_pkey"}))
    assert str(caught.value) == "geofences_pkey is an index, not a table (TPX_GEOFENCES_TABLE)"


def test_geometry_of_another_type_is_named(conn: psycopg.Connection[Any], cms: Settings) -> None:
    conn.execute("ALTER TABLE geofences ALTER COLUMN geometry TYPE text")
    with pytest.raises(TablesMissing) as caught:
        inspect_tables(conn, cms)
    assert str(caught.value) == "geofences.geometry is text: expected a PostGIS geometry or json/jsonb"


def test_a_json_geometry_column_reads_like_jsonb(conn: psycopg.Connection[Any], cms: Settings) -> None:
    conn.execute("ALTER TABLE geofences ALTER COLUMN geometry TYPE json")
    tables = inspect_tables(conn, cms)
    assert tables.geometry == "json"
    gid = insert(conn, "start")
    assert load_geofences(conn, tables).by_id[gid].geometry == SQUARE


def test_schema_qualified_names_are_quoted_part_by_part(pg_server_url: str, schema: str) -> None:
    other = f"{schema}_Cms Data"  # upper case and a space: wrong unless each part is quoted
    create_cms(pg_server_url, other)
    try:
        settings = Settings(
            database_url=pg_server_url,
            db_schema=schema,
            geofences_table=f"{other}.geofences",
            timing_table=f"{other}.timing_records",
        )
        with connect(settings) as conn:
            tables = inspect_tables(conn, settings)
            assert tables.geofences_ident().as_string(conn) == f'"{other}"."geofences"'
            assert tables.timing_ident().as_string(conn) == f'"{other}"."timing_records"'
            assert tables.timing_columns == ALL_TIMING_COLUMNS
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(other)))
            gid = insert(conn, "start")
            conn.execute(search_path(settings))
            assert list(load_geofences(conn, tables).by_id) == [gid]
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(other)))


# --- TPX_DOMAIN: auto, on, off -----------------------------------------------------------------


def test_domain_off_does_not_look_at_the_tables(conn: psycopg.Connection[Any], cms: Settings) -> None:
    off = cms.model_copy(update={"domain": "off"})
    assert decide(conn, off) == (None, "domain off (TPX_DOMAIN=off)")
    broken = off.model_copy(update={"geofences_table": "nosuch.nosuch"})
    assert decide(conn, broken) == (None, "domain off (TPX_DOMAIN=off)")


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_domain_auto_and_on_use_the_tables_when_they_check_out(
    conn: psycopg.Connection[Any], cms: Settings, mode: str
) -> None:
    tables, line = decide(conn, cms.model_copy(update={"domain": mode}))
    assert tables == inspect_tables(conn, cms)
    assert line == (
        "domain on: geofences from geofences (GeoJSON in json, id integer), timing records to timing_records"
    )


def test_domain_auto_is_off_naming_what_is_missing(
    conn: psycopg.Connection[Any], cms: Settings, schema: str
) -> None:
    settings = cms.model_copy(update={"domain": "auto", "timing_table": f"{schema}.timings"})
    assert decide(conn, settings) == (
        None,
        f"domain off: table {schema}.timings not found (TPX_TIMING_TABLE); set TPX_DOMAIN=on to require it",
    )


def test_domain_on_refuses_a_missing_column(conn: psycopg.Connection[Any], cms: Settings) -> None:
    conn.execute("ALTER TABLE timing_records DROP COLUMN ts")
    with pytest.raises(TablesMissing, match=r"^timing_records has no column ts$"):
        decide(conn, cms.model_copy(update={"domain": "on"}))


# --- reading geofences ---------------------------------------------------------------------------


def test_valid_inactive_and_invalid_geofences_are_told_apart(
    conn: psycopg.Connection[Any], tables: CmsTables
) -> None:
    ids = insert_all(conn)
    fences = load_geofences(conn, tables)
    assert by_name(fences, ids) == (LOADED, INVALID_REASONS)
    pit = fences.by_id[ids["pit"]]
    assert (pit.kind, pit.radius_m, pit.geometry, pit.exit_margin_m) == ("circle", 50.0, POINT, 0.0)


def test_numeric_columns_are_read_as_floats(conn: psycopg.Connection[Any], cms: Settings) -> None:
    conn.execute(
        "ALTER TABLE geofences ALTER COLUMN radius_m TYPE numeric(10, 2),"
        " ALTER COLUMN exit_margin_m TYPE numeric(8, 3)"
    )
    tables = inspect_tables(conn, cms)
    gid = insert(conn, "pit", radius_m=50.25)
    conn.execute("UPDATE geofences SET exit_margin_m = 5.5")
    fences = load_geofences(conn, tables)
    assert fences.invalid == ()
    pit = fences.by_id[gid]
    assert (pit.radius_m, pit.exit_margin_m) == (50.25, 5.5)
    assert type(pit.radius_m) is float and type(pit.exit_margin_m) is float


def test_uuid_ids_are_read_as_text(pg_server_url: str, schema: str) -> None:
    ddl = JSON_DDL.replace(
        "id            serial PRIMARY KEY", "id            uuid PRIMARY KEY DEFAULT gen_random_uuid()", 1
    ).replace("geofence      integer NOT NULL", "geofence      uuid NOT NULL")
    create_cms(pg_server_url, schema, ddl)
    settings = Settings(database_url=pg_server_url, db_schema=schema)
    with connect(settings) as conn:
        tables = inspect_tables(conn, settings)
        assert tables.geofence_id_type == "uuid"
        gid = insert(conn, "start")
        assert isinstance(gid, uuid.UUID)
        assert list(load_geofences(conn, tables).by_id) == [str(gid)]


@pytest.fixture(scope="module")
def postgis_url(pg_server_url: str) -> Iterator[str]:
    """A fresh database with PostGIS (the test server's own database may lack it)."""
    reason = postgis_unavailable(pg_server_url)
    if reason:
        pytest.skip(reason)
    with fresh_database(pg_server_url, postgis=True) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS postgis")
        yield url


def test_a_postgis_geometry_is_read_as_geojson(postgis_url: str, schema: str) -> None:
    create_cms(postgis_url, schema, POSTGIS_DDL)
    settings = Settings(database_url=postgis_url, db_schema=schema)
    with connect(settings) as conn:
        tables = inspect_tables(conn, settings)
        assert tables.geometry == "postgis"
        ids = insert_all(conn, postgis=True)
        fences = load_geofences(conn, tables)
    assert by_name(fences, ids) == (LOADED, INVALID_REASONS)
    assert fences.by_id[ids["start"]].geometry == SQUARE
    assert fences.by_id[ids["finish"]].geometry == LINE


def test_a_postgis_geometry_in_another_srid_is_refused(postgis_url: str, schema: str) -> None:
    create_cms(postgis_url, schema, POSTGIS_DDL.replace("geometry(Geometry,4326)", "geometry(Polygon,3857)"))
    settings = Settings(database_url=postgis_url, db_schema=schema)
    with connect(settings) as conn, pytest.raises(TablesMissing) as caught:
        inspect_tables(conn, settings)
    assert str(caught.value) == (
        "geofences.geometry is geometry(Polygon,3857): expected SRID 4326 (longitude/latitude)"
    )


# --- reloading -----------------------------------------------------------------------------------


def source_for(settings: Settings, tables: CmsTables, reload_s: float = 3600.0) -> GeofenceSource:
    return GeofenceSource(lambda: connect(settings), tables, reload_s)


def test_an_edit_is_picked_up_at_once_after_request_reload(
    conn: psycopg.Connection[Any], cms: Settings, tables: CmsTables, caplog: pytest.LogCaptureFixture
) -> None:
    ids = insert_all(conn)
    source = source_for(cms, tables)
    with caplog.at_level(logging.INFO, logger="tpx.domainstage.geofences"):
        first = source.load(now=0.0)
    assert f"geofences: 3 loaded, 4 invalid (generation {first.generation})" in caplog.messages
    conn.execute(
        "UPDATE geofences SET geometry = %s WHERE id = %s", (json.dumps(SMALLER_SQUARE), ids["start"])
    )
    assert source.maybe_reload(1.0) is first  # not due yet
    caplog.clear()
    source.request_reload()
    with caplog.at_level(logging.INFO, logger="tpx.domainstage.geofences"):
        second = source.maybe_reload(2.0)
    assert second is source.current
    assert second.by_id[ids["start"]].geometry == SMALLER_SQUARE
    assert second.generation != first.generation
    assert caplog.messages == [f"geofences: 3 loaded, 4 invalid (generation {second.generation})"]


def test_a_change_is_picked_up_when_the_reload_period_has_passed(
    conn: psycopg.Connection[Any], cms: Settings, tables: CmsTables
) -> None:
    ids = insert_all(conn)
    source = source_for(cms, tables, reload_s=10.0)
    first = source.load(now=100.0)
    conn.execute("UPDATE geofences SET active = false WHERE id = %s", (ids["pit"],))
    assert source.maybe_reload(109.9) is first
    later = source.maybe_reload(110.0)
    assert set(later.by_id) == {ids["start"], ids["finish"]}


def test_unchanged_rows_keep_the_same_set_and_log_nothing(
    conn: psycopg.Connection[Any], cms: Settings, tables: CmsTables, caplog: pytest.LogCaptureFixture
) -> None:
    insert_all(conn)
    source = source_for(cms, tables)
    first = source.load(now=0.0)
    caplog.clear()
    source.request_reload()
    with caplog.at_level(logging.INFO, logger="tpx.domainstage.geofences"):
        assert source.maybe_reload(1.0) is first
    assert caplog.messages == []


def test_an_invalid_geofence_is_warned_once_with_its_id_and_reason(
    conn: psycopg.Connection[Any], cms: Settings, tables: CmsTables, caplog: pytest.LogCaptureFixture
) -> None:
    ids = insert_all(conn)
    source = source_for(cms, tables)

    def warnings_after(step: Callable[[], object]) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tpx.domainstage.geofences"):
            step()
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    def reload() -> None:
        source.request_reload()
        source.maybe_reload(0.0)

    assert sorted(warnings_after(lambda: source.load(now=0.0))) == sorted(
        f"geofence {ids[name]} is invalid, skipped: {reason}" for name, reason in INVALID_REASONS.items()
    )
    conn.execute("UPDATE geofences SET name = 'renamed' WHERE id = %s", (ids["start"],))
    assert warnings_after(reload) == []  # reloaded (the rows changed), nothing newly invalid
    late = insert(conn, "no-radius", name="late")
    assert warnings_after(reload) == [f"geofence {late} is invalid, skipped: radius_m is missing"]
    conn.execute("UPDATE geofences SET radius_m = 20 WHERE id = %s", (ids["no-radius"],))
    assert warnings_after(reload) == []
    conn.execute("UPDATE geofences SET radius_m = NULL WHERE id = %s", (ids["no-radius"],))
    assert warnings_after(reload) == [f"geofence {ids['no-radius']} is invalid, skipped: radius_m is missing"]


@pytest.mark.timeout(30)
def test_a_database_error_during_reload_keeps_the_loaded_set(
    conn: psycopg.Connection[Any],
    cms: Settings,
    tables: CmsTables,
    pg_proxy: Proxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ids = insert_all(conn)
    via_proxy = cms.model_copy(update={"database_url": postgres_via(cms.database_url, pg_proxy)})
    source = source_for(via_proxy, tables)
    first = source.load(now=0.0)
    pg_proxy.cut()
    conn.execute("UPDATE geofences SET active = false WHERE id = %s", (ids["pit"],))
    source.request_reload()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tpx.domainstage.geofences"):
        assert source.maybe_reload(1.0) is first
    [line] = caplog.records
    assert line.levelno == logging.WARNING
    assert line.getMessage().startswith(
        f"geofences: reload failed, keeping the 3 loaded (generation {first.generation}): "
    )
    assert "\n" not in line.getMessage()
    assert source.failed_reloads == 1
    pg_proxy.restore()
    assert source.maybe_reload(2.0) is first  # a failed reload waits for the period, like any
    source.request_reload()
    assert set(source.maybe_reload(3.0).by_id) == {ids["start"], ids["finish"]}


def test_a_missing_table_fails_the_first_load(conn: psycopg.Connection[Any], cms: Settings) -> None:
    tables = inspect_tables(conn, cms)
    conn.execute("DROP TABLE timing_records, geofences")
    source = source_for(cms, tables)
    with pytest.raises(psycopg.errors.UndefinedTable):
        source.load()
    with pytest.raises(psycopg.errors.UndefinedTable):
        source.maybe_reload(0.0)  # no set to keep yet: the caller must know
    with pytest.raises(RuntimeError, match="not loaded"):
        _ = source.current


def run_threads(n: int, target: Callable[[], None]) -> None:
    threads = [threading.Thread(target=target, name=f"test-writer-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads)


class CountingConnect:
    """A :data:`~tpx.domainstage.geofences.Connect` that counts the loads it serves."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.reads = 0
        self._lock = threading.Lock()

    def __call__(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        with self._lock:
            self.reads += 1
        return connect(self.settings)


@pytest.mark.parametrize("loaded_first", [True, False], ids=["reload-due", "first-load"])
def test_threads_that_find_a_load_due_read_the_table_once(
    conn: psycopg.Connection[Any], cms: Settings, tables: CmsTables, loaded_first: bool
) -> None:
    insert_all(conn)
    counting = CountingConnect(cms)
    source = GeofenceSource(counting, tables, 3600.0)
    if loaded_first:
        source.load(now=0.0)
        source.request_reload()
    start = threading.Barrier(8)
    got: list[GeofenceSet] = []

    def writer() -> None:
        start.wait(timeout=10)
        got.append(source.maybe_reload(1.0))

    run_threads(8, writer)
    assert counting.reads == (2 if loaded_first else 1)
    assert len(got) == 8 and all(s is source.current for s in got)


def test_a_slow_reload_does_not_hold_up_the_other_threads(
    conn: psycopg.Connection[Any], cms: Settings, tables: CmsTables
) -> None:
    insert_all(conn)
    entered, release = threading.Event(), threading.Event()
    loads = 0

    @contextlib.contextmanager
    def slow() -> Iterator[psycopg.Connection[Any]]:
        nonlocal loads
        loads += 1
        if loads > 1:  # the reload: wait until the test has looked
            entered.set()
            assert release.wait(timeout=20)
        with connect(cms) as c:
            yield c

    source = GeofenceSource(slow, tables, 3600.0)
    first = source.load(now=0.0)
    source.request_reload()
    reloader = threading.Thread(target=lambda: source.maybe_reload(1.0), name="test-reloader")
    reloader.start()
    try:
        assert entered.wait(timeout=10)
        answered: list[GeofenceSet] = []
        # due by the clock too (the reload started at 1.0): still no waiting for the one running
        other = threading.Thread(
            target=lambda: answered.append(source.maybe_reload(5000.0)), name="test-other"
        )
        other.start()
        other.join(timeout=5)
        assert answered == [first]  # at once, while the reload is still reading
    finally:
        release.set()
        reloader.join(timeout=20)
    assert loads == 2


# --- tpx geofences -------------------------------------------------------------------------------


def tpx(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["geofences", *args], env={**env, "COLUMNS": "200"})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def env(cms: Settings) -> dict[str, str]:
    return {"TPX_DATABASE_URL": cms.database_url, "TPX_DB_SCHEMA": cms.db_schema}


def test_tpx_geofences_lists_each_one_and_why_it_is_not_used(
    conn: psycopg.Connection[Any], env: dict[str, str]
) -> None:
    ids = insert_all(conn)
    code, out, err = tpx(env, "--json")
    assert (code, err) == (0, "")
    statuses = {name: "invalid" if name in INVALID_REASONS else "loaded" for name in FENCES}
    statuses["closed"] = "inactive"
    assert json.loads(out) == [
        {
            "id": ids[name],
            "name": name,
            "kind": kind,
            "active": active,
            "status": statuses[name],
            "reason": INVALID_REASONS.get(name, ""),
        }
        for name, (kind, _, _, active) in FENCES.items()
    ]
    code, out, err = tpx(env)
    assert (code, err) == (0, "")
    assert "radius_m is missing" in out and "inactive" in out
    assert out.splitlines()[-1] == "3 loaded, 1 inactive, 4 invalid"


def test_tpx_geofences_reads_postgis_too(postgis_url: str, schema: str) -> None:
    create_cms(postgis_url, schema, POSTGIS_DDL)
    settings = Settings(database_url=postgis_url, db_schema=schema)
    with connect(settings) as conn:
        ids = insert_all(conn, postgis=True)
    code, out, _ = tpx({"TPX_DATABASE_URL": postgis_url, "TPX_DB_SCHEMA": schema}, "--json")
    assert code == 0
    assert {r["name"]: r["reason"] for r in json.loads(out) if r["status"] == "invalid"} == INVALID_REASONS
    assert {r["id"] for r in json.loads(out)} == set(ids.values())


def test_tpx_geofences_with_an_empty_table(env: dict[str, str]) -> None:
    assert tpx(env, "--json")[:2] == (0, "[]\n")
    code, out, _ = tpx(env)
    assert (code, out) == (0, "no geofences in geofences\n")


def test_tpx_geofences_exits_2_in_one_line_when_a_table_is_missing(
    conn: psycopg.Connection[Any], env: dict[str, str]
) -> None:
    conn.execute("ALTER TABLE geofences DROP COLUMN kind")
    code, out, err = tpx(env)
    assert (code, out, err) == (exitcodes.USAGE, "", "tpx: geofences has no column kind\n")
    code, out, err = tpx({**env, "TPX_GEOFENCES_TABLE": "nosuch.fences"}, "--json")
    line = "table nosuch.fences not found (TPX_GEOFENCES_TABLE)"
    assert (code, err) == (exitcodes.USAGE, f"tpx: {line}\n")
    assert json.loads(out) == {"error": line, "exit_code": exitcodes.USAGE}


@pytest.mark.parametrize(
    ("url", "code", "start"),
    [
        (
            "postgresql://postgres@127.0.0.1:1/postgres",
            exitcodes.UNAVAILABLE,
            "tpx: cannot reach PostgreSQL at",
        ),
        ("not a dsn", exitcodes.USAGE, "tpx: invalid setting TPX_DATABASE_URL / --database-url:"),
    ],
)
def test_tpx_geofences_exits_in_one_line_without_a_server(url: str, code: int, start: str) -> None:
    got, out, err = tpx({"TPX_DATABASE_URL": url})
    assert (got, out) == (code, "")
    assert err.startswith(start) and err.count("\n") == 1, err


def test_a_role_that_may_not_change_timing_records_is_named(pg_server_url: str, cms: Settings) -> None:
    # a role with SELECT and INSERT but not UPDATE or DELETE would write nothing (every upsert
    # refused with 42501); the check names what to GRANT
    role = f"t_role_{uuid.uuid4().hex[:8]}"
    schema = sql.Identifier(cms.db_schema)
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        admin.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, sql.Identifier(role)))
        admin.execute(sql.SQL("GRANT SELECT ON {}.geofences TO {}").format(schema, sql.Identifier(role)))
        admin.execute(
            sql.SQL("GRANT SELECT, INSERT ON {}.timing_records TO {}").format(schema, sql.Identifier(role))
        )
    try:
        as_role = cms.model_copy(
            update={"database_url": psycopg.conninfo.make_conninfo(pg_server_url, user=role)}
        )
        with connect(as_role) as conn, pytest.raises(TablesMissing) as caught:
            inspect_tables(conn, as_role)
        assert str(caught.value) == (
            "tpx's role may not UPDATE, DELETE on timing_records (GRANT it, or TPX_DOMAIN=off)"
        )
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.mark.parametrize(
    ("alter", "message"),
    [
        ("ALTER TABLE timing_records ALTER COLUMN id TYPE text", "timing_records.id is text: expected uuid"),
        (
            "ALTER TABLE timing_records ALTER COLUMN ts TYPE timestamp",
            "timing_records.ts is timestamp without time zone: expected timestamptz",
        ),
        (
            "ALTER TABLE timing_records DROP CONSTRAINT timing_records_geofence_foreign,"
            " ALTER COLUMN geofence TYPE bigint",
            "timing_records.geofence is bigint: expected integer, the type of the geofences' id",
        ),
    ],
)
def test_a_column_of_another_type_is_named(
    conn: psycopg.Connection[Any], cms: Settings, alter: str, message: str
) -> None:
    # Directus's Data Studio makes an integer id by default: tpx derives uuids, so every insert
    # would fail; the check says so at start-up instead
    conn.execute(alter)
    with pytest.raises(TablesMissing) as caught:
        inspect_tables(conn, cms)
    assert str(caught.value) == message
