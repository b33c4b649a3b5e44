"""Migrations: idempotent, safe when several instances start at once, TimescaleDB optional."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tpx.schema import MIGRATIONS_TABLE, current_version, latest_version, load_migrations, migrate


def test_migrate_creates_positions_with_contract_columns(pg_server_url: str, schema: str) -> None:
    report = migrate(pg_server_url, schema)
    assert report.applied == [f"{m.version:03d}_{m.name}" for m in load_migrations()]
    with psycopg.connect(pg_server_url) as conn:
        cols = conn.execute(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = 'positions' ORDER BY ordinal_position",
            (schema,),
        ).fetchall()
        pk = conn.execute(
            "SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_index i"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
            " WHERE i.indrelid = %s::regclass AND i.indisprimary",
            (f"{schema}.positions",),
        ).fetchone()
    assert cols == [
        ("device_id", "text", "NO"),
        ("ts", "timestamp with time zone", "NO"),
        ("latitude", "double precision", "NO"),
        ("longitude", "double precision", "NO"),
        ("altitude", "real", "YES"),
        ("angle", "real", "YES"),
        ("speed", "real", "YES"),
        ("satellites", "smallint", "YES"),
        ("priority", "smallint", "YES"),
        ("event_io_id", "integer", "YES"),
        ("valid", "boolean", "NO"),
        ("attributes", "jsonb", "NO"),
        ("received_at", "timestamp with time zone", "YES"),
        ("ingested_at", "timestamp with time zone", "NO"),
    ]
    assert pk == (["device_id", "ts"],)


def test_migrate_is_idempotent(pg_server_url: str, schema: str) -> None:
    first = migrate(pg_server_url, schema)
    second = migrate(pg_server_url, schema)
    assert first.applied and second.applied == []
    assert second.current_version == latest_version()
    with psycopg.connect(pg_server_url) as conn:
        assert current_version(conn, schema) == latest_version()
        n = conn.execute(
            sql.SQL("SELECT count(*) FROM {}.{}").format(
                sql.Identifier(schema), sql.Identifier(MIGRATIONS_TABLE)
            )
        ).fetchone()
    assert n == (len(load_migrations()),)


def test_concurrent_migrations_apply_once(pg_server_url: str, schema: str) -> None:
    reports = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def run() -> None:
        barrier.wait()
        try:
            reports.append(migrate(pg_server_url, schema))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(len(r.applied) for r in reports) == [0] * 5 + [len(load_migrations())]


@pytest.mark.slow  # `tpx migrate` in subprocesses
def test_concurrent_migrate_commands(pg_server_url: str, schema: str) -> None:
    """Two `tpx migrate` processes at once: both succeed, the work is done once."""
    cmd = [sys.executable, "-m", "tpx", "migrate", "--database-url", pg_server_url, "--db-schema", schema]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    applied = [o for o, _ in outs if "applied 001_positions" in o]
    assert len(applied) == 1, outs


def test_without_timescaledb_positions_is_a_plain_table(pg_server_url: str, schema: str) -> None:
    with psycopg.connect(pg_server_url) as conn:
        available = conn.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
        ).fetchone()
    if available:
        pytest.skip("this server has TimescaleDB")
    report = migrate(pg_server_url, schema)
    assert report.storage == "table"
    assert "not installed" in report.storage_line()


def _sharedir(dsn: str) -> Path | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT setting FROM pg_config WHERE name = 'SHAREDIR'").fetchone()
    return Path(row[0]) / "extension" if row else None


#: A database sets this (ALTER DATABASE ... SET) to let the fake timescaledb's script succeed there.
FAKE_CREATABLE_GUC = "tpx_test.fake_timescaledb"


@pytest.fixture
def fake_timescaledb(pg_server_url: str) -> Iterator[None]:
    """A `timescaledb` the server lists in pg_available_extensions (control file + script).

    The extension directory is the installation's, seen by every database, so the script is
    harmless elsewhere: it raises an ERROR (as the old fake did) unless the database sets
    ``tpx_test.fake_timescaledb = 'create'``, where it creates one trivial function.
    """
    try:
        ext = _sharedir(pg_server_url)
    except psycopg.errors.InsufficientPrivilege:
        pytest.skip("cannot read pg_config")
    if ext is None or not ext.is_dir():
        pytest.skip("no extension directory")
    control = ext / "timescaledb.control"
    script = ext / "timescaledb--0.0.1.sql"
    if control.exists():
        pytest.skip("a timescaledb is installed (real, or another test's fake)")
    try:
        # like the real control file: not relocatable, no fixed schema
        control.write_text("default_version = '0.0.1'\nrelocatable = false\n")
        script.write_text(
            "DO $$ BEGIN\n"
            f"  IF current_setting('{FAKE_CREATABLE_GUC}', true) IS DISTINCT FROM 'create' THEN\n"
            "    RAISE EXCEPTION 'extension \"timescaledb\" must be preloaded';\n"
            "  END IF;\n"
            "END $$;\n"
            "CREATE FUNCTION tpx_fake_timescaledb() RETURNS int LANGUAGE sql AS 'SELECT 1';\n"
        )
    except OSError:
        pytest.skip("extension directory is not writable here")
    try:
        yield
    finally:
        control.unlink(missing_ok=True)
        script.unlink(missing_ok=True)


@pytest.fixture
def private_db(pg_server_url: str) -> Iterator[str]:
    """A database of this test's own (for database-wide state: event triggers, settings)."""
    name = f"tpx_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(pg_server_url, dbname=name)
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _kill_session_on_create_extension(dsn: str) -> None:
    """Make ``CREATE EXTENSION`` end the session, as TimescaleDB does when it is not preloaded.

    The real server answers ``FATAL:  extension "timescaledb" must be preloaded`` (HINT: Please
    preload the timescaledb library via shared_preload_libraries) and closes the connection; no
    savepoint survives that. Here the session terminates itself; psycopg reports
    ``AdminShutdown: terminating connection due to administrator command`` (SQLSTATE 57P01) and
    the connection is broken, exactly what the real FATAL leaves.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION kill_on_create_extension() RETURNS event_trigger LANGUAGE plpgsql AS $$"
            " BEGIN IF tg_tag = 'CREATE EXTENSION' THEN"
            " PERFORM pg_terminate_backend(pg_backend_pid()); END IF; END $$"
        )
        conn.execute(
            "CREATE EVENT TRIGGER kill_on_create_extension ON ddl_command_start"
            " EXECUTE FUNCTION kill_on_create_extension()"
        )
    with psycopg.connect(dsn) as conn, pytest.raises(psycopg.OperationalError) as info:
        conn.execute("CREATE EXTENSION timescaledb SCHEMA public")
    assert "terminating connection due to administrator command" in str(info.value)
    assert conn.broken


def _migrate_cmd(dsn: str, schema: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tpx", "migrate", "--database-url", dsn, "--db-schema", schema, *args]
    environ = {**os.environ, "TPX_LOG_FORMAT": "json", **env}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=environ)


def _warnings(stderr: str) -> list[str]:
    """The WARNING log lines (JSON) a command wrote to stderr."""
    found = []
    for line in stderr.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") == "WARNING":
            found.append(str(entry["message"]))
    return found


@pytest.mark.slow  # `tpx migrate` in subprocesses
@pytest.mark.parametrize(
    ("case", "reason"),
    [
        # the real server's state right after installing the package: tpx must not even try
        ("not preloaded", "installed but not preloaded"),
        # the check let it through (timescaledb.allow_install_without_preload = on) and the
        # session still dies in CREATE EXTENSION: nothing committed is lost, the reason is named
        ("session lost", "terminating connection due to administrator command"),
        # an ordinary ERROR (e.g. no privilege): rolled back on its own connection
        ("error", 'CREATE EXTENSION timescaledb failed: extension "timescaledb" must be preloaded'),
    ],
)
def test_timescaledb_that_cannot_load_leaves_a_migrated_plain_table(
    private_db: str, fake_timescaledb: None, case: str, reason: str
) -> None:
    if case != "error":
        _kill_session_on_create_extension(private_db)
    if case != "not preloaded":
        with psycopg.connect(private_db, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET timescaledb.allow_install_without_preload = 'on'").format(
                    sql.Identifier(conn.info.dbname)
                )
            )
    schema = "tpx_fleet"
    for attempt in (1, 2):  # a second start, on a migrated database, must succeed too
        done = _migrate_cmd(private_db, schema, "--json")
        assert done.returncode == 0, (attempt, done.stdout, done.stderr)
        report = json.loads(done.stdout)
        assert report["storage"] == "table" and reason in report["storage_reason"], report
        warnings = [w for w in _warnings(done.stderr) if "timescaledb" in w.lower()]
        assert len(warnings) == 1, done.stderr
        assert reason in warnings[0]
        assert "shared_preload_libraries" in warnings[0] and "restart PostgreSQL" in warnings[0]
        assert "OPERATIONS.md" in warnings[0]
    with psycopg.connect(private_db) as conn:
        kind = conn.execute("SELECT relkind FROM pg_class WHERE oid = %s::regclass", (f"{schema}.positions",))
        assert kind.fetchone() == ("r",)
        applied = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, MIGRATIONS_TABLE))
        ).fetchone()
        assert applied == (len(load_migrations()),)
        assert conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone() is None


def test_timescaledb_is_created_outside_tpx_schema(private_db: str, fake_timescaledb: None) -> None:
    """Dropping tpx's schema must not drop the extension other tables in the database may use."""
    with psycopg.connect(private_db, autocommit=True) as conn:
        db = sql.Identifier(conn.info.dbname)
        creatable = sql.Identifier(FAKE_CREATABLE_GUC)
        conn.execute(sql.SQL("ALTER DATABASE {} SET {} = 'create'").format(db, creatable))
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET timescaledb.allow_install_without_preload = 'on'").format(db)
        )
        # as where an operator points the database's search_path at tpx's schema
        conn.execute(sql.SQL("ALTER DATABASE {} SET search_path = tpx_fleet, public").format(db))
    migrate(private_db, "tpx_fleet")
    with psycopg.connect(private_db, autocommit=True) as conn:
        where = conn.execute(
            "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'timescaledb'"
        ).fetchone()
        assert where == ("public",)
        conn.execute("DROP SCHEMA tpx_fleet CASCADE")
        assert conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone() == (1,)


def test_migrate_never_touches_other_tables(pg_server_url: str, schema: str) -> None:
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL("CREATE TABLE {}.directus_users (id int primary key, email text)").format(
                sql.Identifier(schema)
            )
        )
        conn.execute(
            sql.SQL("INSERT INTO {}.directus_users VALUES (1, 'a@b')").format(sql.Identifier(schema))
        )
        before = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
        ).fetchall()
    migrate(pg_server_url, schema)
    with psycopg.connect(pg_server_url) as conn:
        after = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
        ).fetchall()
        users = conn.execute(
            sql.SQL("SELECT * FROM {}.directus_users").format(sql.Identifier(schema))
        ).fetchall()
    assert set(after) - set(before) == {
        ("positions",),
        (MIGRATIONS_TABLE,),
        ("tpx_domain_devices",),
        ("tpx_domain_generations",),
        ("tpx_domain_recomputes",),
        ("tpx_domain_missed",),
        ("tpx_domain_queue",),
        ("tpx_domain_queued",),
    }
    assert users == [(1, "a@b")]


def test_timescale_policies_are_ignored_without_a_hypertable(pg_server_url: str, schema: str) -> None:
    with psycopg.connect(pg_server_url) as conn:
        if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone():
            pytest.skip("this server has TimescaleDB")
    report = migrate(pg_server_url, schema, compress_after="14d", retain_for="365d")
    assert report.storage == "table"
    assert report.policies == ["TPX_COMPRESS_AFTER / TPX_RETAIN_FOR ignored: positions is not a hypertable"]


@pytest.mark.slow  # `tpx migrate` in subprocesses
def test_migrate_command_applies_the_timescale_settings(pg_server_url: str, schema: str) -> None:
    """A rolling deploy runs `tpx migrate` alone: it must read TPX_COMPRESS_AFTER / --retain-for too."""
    with psycopg.connect(pg_server_url) as conn:
        if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone():
            pytest.skip("this server lists a timescaledb extension")
    ignored = "TPX_COMPRESS_AFTER / TPX_RETAIN_FOR ignored: positions is not a hypertable"
    as_json = _migrate_cmd(pg_server_url, schema, "--json", TPX_COMPRESS_AFTER="14d")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["policies"] == [ignored]
    assert [w for w in _warnings(as_json.stderr) if "ignored" in w] == [f"timescaledb: {ignored}"]
    as_text = _migrate_cmd(pg_server_url, schema, "--retain-for", "365d")
    assert as_text.returncode == 0, as_text.stderr
    assert f"timescaledb: {ignored}" in as_text.stdout.splitlines()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"compress_after": "1d"}, "must be at least TPX_LATE_WINDOW"),
        ({"compress_after": "14d", "retain_for": "7d"}, "must be longer than TPX_COMPRESS_AFTER"),
        ({"retain_for": "forever"}, "not a duration"),
    ],
)
def test_timescale_settings_are_validated(env: dict[str, str], message: str) -> None:
    from tpx.config import ConfigError, load

    with pytest.raises(ConfigError) as info:
        load(database_url="postgresql://u:secretpw@h/db", **env)
    text = " ".join(info.value.lines)
    assert message in text and "secretpw" not in text


def _device_id_collation(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> object:
    row = conn.execute(
        "SELECT attcollation::regcollation::text FROM pg_attribute"
        " WHERE attrelid = %s::regclass AND attname = 'device_id'",
        (f"{schema}.positions",),
    ).fetchone()
    return row[0] if row else None


def test_a_new_install_compares_device_ids_bytewise(pg_server_url: str, schema: str) -> None:
    migrate(pg_server_url, schema)
    with psycopg.connect(pg_server_url) as conn:
        assert _device_id_collation(conn, schema) == '"C"'


def test_the_collation_migration_leaves_a_table_with_rows_alone(
    pg_server_url: str, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An install from before migration 002, holding rows: no index rebuild at start-up, a warning."""
    migrate(pg_server_url, schema)
    target = sql.Identifier(schema, "positions")
    with psycopg.connect(pg_server_url) as conn:
        conn.execute(
            sql.SQL('ALTER TABLE {} ALTER COLUMN device_id TYPE text COLLATE "default"').format(target)
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (device_id, ts, latitude, longitude, valid) VALUES ('a', now(), 1, 2, true)"
            ).format(target)
        )
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE version >= 2").format(sql.Identifier(schema, MIGRATIONS_TABLE))
        )
    caplog.set_level("WARNING", logger="tpx.schema")
    report = migrate(pg_server_url, schema)
    assert "002_device_id_collate_c" in report.applied
    assert report.current_version == latest_version()
    with psycopg.connect(pg_server_url) as conn:
        assert _device_id_collation(conn, schema) == '"default"'
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(target)).fetchone() == (1,)
    assert any("keeps its collation (the table holds rows)" in r.getMessage() for r in caplog.records)
    # the server's routine notices (CREATE .. IF NOT EXISTS on a second run) stay out of the log
    assert not any("already exists" in r.getMessage() for r in caplog.records)
