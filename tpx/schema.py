"""Schema migrations: numbered SQL files applied under a Postgres advisory lock.

The runner owns exactly two tables in its schema: ``positions`` and
``tpx_schema_migrations`` (what it applied, when, with which checksum). It never
touches any other table. Everything happens in one transaction that first takes
a transaction-level advisory lock, so two instances starting at once apply each
migration exactly once: the second waits, then finds nothing left to do.

After the files, ``positions`` becomes a TimescaleDB hypertable on ``ts`` when
the extension is installed on the server and can be created and loaded. When it
cannot (not installed, not preloaded, not allow-listed, no privilege), every
attempt runs inside a savepoint, is rolled back, and ``positions`` stays an
ordinary table; :class:`MigrationReport` says which and why.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.abc import Query

from tpx.errors import first_line

log = logging.getLogger(__name__)

MIGRATIONS_TABLE = "tpx_schema_migrations"
_FILE_RE = re.compile(r"(\d{3,})_([a-z0-9_]+)\.sql")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass
class MigrationReport:
    schema: str
    applied: list[str] = field(default_factory=list)
    storage: str = "table"  # "hypertable" or "table"
    storage_reason: str = ""
    current_version: int = 0
    policies: list[str] = field(default_factory=list)

    def storage_line(self) -> str:
        if self.storage == "hypertable":
            return "positions is a TimescaleDB hypertable on ts"
        return f"positions is an ordinary table (TimescaleDB not used: {self.storage_reason})"


def sql_dir() -> Path:
    """The migration files: packaged as ``tpx/sql`` in a wheel, ``sql/`` in a checkout."""
    packaged = resources.files("tpx").joinpath("sql")
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "sql"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or sql_dir()
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_RE.fullmatch(path.name)
        if match is None:
            continue
        found.append(Migration(int(match.group(1)), match.group(2), path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {directory}")
    return found


def latest_version() -> int:
    migrations = load_migrations()
    return migrations[-1].version if migrations else 0


def _lock_key(schema: str) -> int:
    digest = hashlib.sha256(f"tpx.migrate:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _try(conn: psycopg.Connection[tuple[object, ...]], statement: Query) -> str | None:
    """Run one statement in a savepoint; return None on success or the error's first line."""
    try:
        with conn.transaction():
            conn.execute(statement)
    except psycopg.Error as exc:
        return first_line(exc)
    return None


def _timescale(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> tuple[str, str]:
    """Make positions a hypertable when we can; return (storage, reason)."""
    row = conn.execute(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'"
    ).fetchone()
    if row is None:
        return "table", "the timescaledb extension is not installed on the server"
    installed = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
    if installed is None:
        error = _try(conn, "CREATE EXTENSION IF NOT EXISTS timescaledb")
        if error is not None:
            return "table", f"CREATE EXTENSION timescaledb failed: {error}"
    exists = (
        conn.execute(
            "SELECT 1 FROM timescaledb_information.hypertables"
            " WHERE hypertable_schema = %s AND hypertable_name = 'positions'",
            (schema,),
        ).fetchone()
        if _try(conn, "SELECT 1 FROM timescaledb_information.hypertables LIMIT 1") is None
        else None
    )
    if exists is not None:
        return "hypertable", ""
    target = sql.Literal(f"{sql.Identifier(schema).as_string(None)}.positions")
    error = _try(
        conn,
        sql.SQL(
            "SELECT create_hypertable({}::regclass, 'ts', migrate_data => true, if_not_exists => true)"
        ).format(target),
    )
    if error is not None:
        return "table", f"create_hypertable failed: {error}"
    return "hypertable", ""


def _policies(
    conn: psycopg.Connection[tuple[object, ...]], schema: str, compress_after: str, retain_for: str
) -> list[str]:
    """Compression and retention policies for the hypertable; returns what was done or refused."""
    done = []
    target = f"{sql.Identifier(schema).as_string(None)}.positions"
    if compress_after:
        error = _try(
            conn,
            sql.SQL(
                "ALTER TABLE {}.positions SET (timescaledb.compress,"
                " timescaledb.compress_segmentby = 'device_id', timescaledb.compress_orderby = 'ts DESC')"
            ).format(sql.Identifier(schema)),
        )
        if error is None:
            error = _try(
                conn,
                sql.SQL(
                    "SELECT add_compression_policy({}::regclass, {}::interval, if_not_exists => true)"
                ).format(sql.Literal(target), sql.Literal(_interval(compress_after))),
            )
        done.append(f"compression after {compress_after}" + (f" FAILED: {error}" if error else ""))
    if retain_for:
        error = _try(
            conn,
            sql.SQL("SELECT add_retention_policy({}::regclass, {}::interval, if_not_exists => true)").format(
                sql.Literal(target), sql.Literal(_interval(retain_for))
            ),
        )
        done.append(f"retention {retain_for}" + (f" FAILED: {error}" if error else ""))
    return done


def _interval(duration: str) -> str:
    from tpx.config import parse_duration

    return f"{int(parse_duration(duration))} seconds"


#: A migration tells the operator about a step it skipped with ``RAISE NOTICE 'tpx: ...'``.
NOTICE_PREFIX = "tpx: "


def _log_notice(diag: psycopg.errors.Diagnostic) -> None:
    """Log a migration's own notices; the server's routine ones ("already exists, skipping") stay out."""
    message = diag.message_primary or ""
    if message.startswith(NOTICE_PREFIX):
        log.warning("migration: %s", message.removeprefix(NOTICE_PREFIX))


def migrate(
    conninfo: str, schema: str = "public", compress_after: str = "", retain_for: str = ""
) -> MigrationReport:
    """Apply pending migrations to ``schema``; safe to run from several processes at once."""
    report = MigrationReport(schema=schema)
    migrations = load_migrations()
    with psycopg.connect(conninfo, autocommit=False, application_name="tpx-migrate") as conn:
        conn.add_notice_handler(_log_notice)
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(schema),))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET LOCAL search_path TO {}, public").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " version integer PRIMARY KEY,"
                " name text NOT NULL,"
                " checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(sql.Identifier(MIGRATIONS_TABLE))
        )
        applied = {
            int(str(v)): str(c)
            for v, c in conn.execute(
                sql.SQL("SELECT version, checksum FROM {}").format(sql.Identifier(MIGRATIONS_TABLE))
            ).fetchall()
        }
        for migration in migrations:
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    log.warning(
                        "migration %03d_%s changed since it was applied (checksum differs); not re-applied",
                        migration.version,
                        migration.name,
                    )
                continue
            log.info("applying migration %03d_%s", migration.version, migration.name)
            conn.execute(migration.text.encode())
            conn.execute(
                sql.SQL("INSERT INTO {} (version, name, checksum) VALUES (%s, %s, %s)").format(
                    sql.Identifier(MIGRATIONS_TABLE)
                ),
                (migration.version, migration.name, migration.checksum),
            )
            report.applied.append(f"{migration.version:03d}_{migration.name}")
        report.storage, report.storage_reason = _timescale(conn, schema)
        if report.storage == "hypertable":
            report.policies = _policies(conn, schema, compress_after, retain_for)
        elif compress_after or retain_for:
            report.policies = ["TPX_COMPRESS_AFTER / TPX_RETAIN_FOR ignored: positions is not a hypertable"]
        report.current_version = max([*applied, *(m.version for m in migrations)], default=0)
        conn.commit()
    return report


def current_version(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> int | None:
    """The newest applied migration in ``schema``, or None when tpx never migrated it."""
    try:
        with conn.transaction():
            row = conn.execute(
                sql.SQL("SELECT max(version) FROM {}.{}").format(
                    sql.Identifier(schema), sql.Identifier(MIGRATIONS_TABLE)
                )
            ).fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    return int(str(row[0])) if row and row[0] is not None else None
