"""Schema migrations: numbered SQL files applied under a Postgres advisory lock.

The runner owns these tables in its schema: ``positions``,
``tpx_schema_migrations`` (what it applied, when, with which checksum) and the domain
stage's bookkeeping (``tpx_domain_devices``, ``tpx_domain_generations``,
``tpx_domain_recomputes``, ``tpx_domain_missed``, ``tpx_domain_queue``). It never
touches any other table (the CMS's geofences and timing records included). The
files run in one transaction that first takes a transaction-level advisory lock,
so two instances starting at once apply each migration exactly once: the second
waits, then finds nothing left to do.

That transaction is committed before TimescaleDB is touched. The TimescaleDB
step (create the extension, make ``positions`` a hypertable on ``ts``, add the
policies) runs afterwards on a connection of its own, under the same lock:
TimescaleDB answers some mistakes with a FATAL that ends the session (``extension
"timescaledb" must be preloaded``), which no savepoint survives, so the step
must have nothing to lose. Where TimescaleDB cannot be used (not installed, not
preloaded, no privilege, the session ended), ``positions`` stays an ordinary
table and :class:`MigrationReport` says why and what to do about it.

:func:`migrate_for` is the one entry point of ``tpx migrate`` and ``tpx serve``:
it reads every setting migrations use and logs the report the same way for both.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import psycopg
from psycopg import sql
from psycopg.abc import Query

from tpx.connections import pg_connect
from tpx.errors import first_line

if TYPE_CHECKING:
    from tpx.config import Settings

log = logging.getLogger(__name__)

MIGRATIONS_TABLE = "tpx_schema_migrations"
#: What ``positions`` is: a TimescaleDB hypertable on ``ts``, or an ordinary table.
Storage = Literal["hypertable", "table"]
_FILE_RE = re.compile(r"(\d{3,})_([a-z0-9_]+)\.sql")

#: Where ``CREATE EXTENSION timescaledb`` puts the extension. Its control file fixes no schema
#: (``relocatable = false``: relocatable during installation only), so without ``SCHEMA`` it lands
#: in the first schema of search_path, tpx's, and ``DROP SCHEMA ... CASCADE`` would drop it.
EXTENSION_SCHEMA = "public"

#: What an operator does when TimescaleDB is installed but not loadable; the conversion itself is
#: the next migrate (``create_hypertable(..., migrate_data => true)``), described in OPERATIONS.md.
HINT_PRELOAD = (
    "to get the hypertable: add timescaledb to shared_preload_libraries in postgresql.conf,"
    " restart PostgreSQL, then run `tpx migrate` again to convert positions"
    ' (OPERATIONS.md, "TimescaleDB")'
)
#: The same, for any other reason the TimescaleDB step failed.
HINT_RETRY = 'fix that, then run `tpx migrate` again to convert positions (OPERATIONS.md, "TimescaleDB")'
#: Said when compression/retention settings are given but there is no hypertable to apply them to.
POLICIES_IGNORED = "TPX_COMPRESS_AFTER / TPX_RETAIN_FOR ignored: positions is not a hypertable"


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
    storage: Storage = "table"
    storage_reason: str = ""
    #: What the operator can do to get the hypertable ("" when there is nothing to do).
    storage_hint: str = ""
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


#: The TimescaleDB step's statement whose lost session means the library is not preloaded.
CREATE_EXTENSION_STEP = "CREATE EXTENSION timescaledb"


class _SessionEndedError(Exception):
    """The server ended the session (a FATAL, or the connection dropped) during ``what``."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(f"the PostgreSQL session ended during {what}: {message}")
        #: a session ended by CREATE EXTENSION is, on a real server, "must be preloaded"
        self.hint = HINT_PRELOAD if what == CREATE_EXTENSION_STEP else HINT_RETRY


def _try(conn: psycopg.Connection[tuple[object, ...]], what: str, statement: Query) -> str | None:
    """Run one statement in a savepoint; return None on success or the error's first line.

    A FATAL ends the session and no savepoint survives it: that raises :class:`_SessionEndedError`
    (the connection is closed, so nothing else tries to use it).
    """
    conn.execute("SAVEPOINT tpx_try")
    try:
        conn.execute(statement)
    except psycopg.Error as exc:
        if conn.broken or (exc.diag.severity_nonlocalized or "") in ("FATAL", "PANIC"):
            conn.close()
            raise _SessionEndedError(what, first_line(exc)) from exc
        conn.execute("ROLLBACK TO SAVEPOINT tpx_try")
        return first_line(exc)
    conn.execute("RELEASE SAVEPOINT tpx_try")
    return None


def _preloaded(libraries: str) -> bool:
    """Whether a ``shared_preload_libraries`` value lists timescaledb (``$libdir/...`` too)."""
    names = (entry.strip().strip('"').rsplit("/", 1)[-1] for entry in libraries.split(","))
    return "timescaledb" in names


def _preload_problem(conn: psycopg.Connection[tuple[object, ...]]) -> str | None:
    """Why loading TimescaleDB would end the session ("must be preloaded"), or None.

    TimescaleDB's loader refuses with a FATAL unless the library is in shared_preload_libraries
    or ``timescaledb.allow_install_without_preload`` is on. A role that may not read
    shared_preload_libraries gets None: the attempt then runs, on a session with nothing to lose.
    """
    row = conn.execute("SELECT current_setting('timescaledb.allow_install_without_preload', true)").fetchone()
    if row is not None and row[0] == "on":
        return None
    conn.execute("SAVEPOINT tpx_preload")
    try:
        row = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()
    except psycopg.errors.InsufficientPrivilege:
        conn.execute("ROLLBACK TO SAVEPOINT tpx_preload")
        return None
    conn.execute("RELEASE SAVEPOINT tpx_preload")
    if row is not None and _preloaded(str(row[0])):
        return None
    return "timescaledb is installed but not preloaded (shared_preload_libraries does not list it)"


@dataclass
class _Storage:
    storage: Storage
    reason: str = ""
    hint: str = ""
    policies: list[str] = field(default_factory=list)


def _hypertable(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> tuple[_Storage, str]:
    """Make positions a hypertable when we can; return the outcome and the extension's schema."""
    row = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()
    if row is None:
        return _Storage("table", "the timescaledb extension is not installed on the server"), ""
    problem = _preload_problem(conn)
    if problem is not None:
        return _Storage("table", problem, HINT_PRELOAD), ""
    row = conn.execute(
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"
        " WHERE e.extname = 'timescaledb'"
    ).fetchone()
    if row is None:
        error = _try(
            conn,
            CREATE_EXTENSION_STEP,
            sql.SQL("CREATE EXTENSION IF NOT EXISTS timescaledb SCHEMA {}").format(
                sql.Identifier(EXTENSION_SCHEMA)
            ),
        )
        if error is not None:
            hint = HINT_PRELOAD if "preload" in error else HINT_RETRY
            return _Storage("table", f"CREATE EXTENSION timescaledb failed: {error}", hint), ""
        extension_schema = EXTENSION_SCHEMA
    else:
        extension_schema = str(row[0])
    error = _try(
        conn,
        "create_hypertable",
        sql.SQL("SELECT {}({}::regclass, 'ts', migrate_data => true, if_not_exists => true)").format(
            sql.Identifier(extension_schema, "create_hypertable"), sql.Literal(_qualified(schema))
        ),
    )
    if error is not None:
        return _Storage("table", f"create_hypertable failed: {error}", HINT_RETRY), extension_schema
    return _Storage("hypertable"), extension_schema


def _qualified(schema: str) -> str:
    """``"schema".positions``, as text for a regclass literal."""
    return f"{sql.Identifier(schema).as_string(None)}.positions"


def _policies(
    conn: psycopg.Connection[tuple[object, ...]],
    schema: str,
    extension_schema: str,
    compress_after: str,
    retain_for: str,
) -> list[str]:
    """Compression and retention policies for the hypertable; returns what was done or refused."""
    done = []
    target = sql.Literal(_qualified(schema))
    if compress_after:
        error = _try(
            conn,
            "ALTER TABLE positions SET (timescaledb.compress)",
            sql.SQL(
                "ALTER TABLE {}.positions SET (timescaledb.compress,"
                " timescaledb.compress_segmentby = 'device_id', timescaledb.compress_orderby = 'ts DESC')"
            ).format(sql.Identifier(schema)),
        )
        if error is None:
            error = _try(
                conn,
                "add_compression_policy",
                sql.SQL("SELECT {}({}::regclass, {}::interval, if_not_exists => true)").format(
                    sql.Identifier(extension_schema, "add_compression_policy"),
                    target,
                    sql.Literal(_interval(compress_after)),
                ),
            )
        done.append(f"compression after {compress_after}" + (f" FAILED: {error}" if error else ""))
    if retain_for:
        error = _try(
            conn,
            "add_retention_policy",
            sql.SQL("SELECT {}({}::regclass, {}::interval, if_not_exists => true)").format(
                sql.Identifier(extension_schema, "add_retention_policy"),
                target,
                sql.Literal(_interval(retain_for)),
            ),
        )
        done.append(f"retention {retain_for}" + (f" FAILED: {error}" if error else ""))
    return done


def _timescale(conninfo: str, schema: str, compress_after: str, retain_for: str) -> _Storage:
    """The TimescaleDB step, on its own connection and transaction: a lost session loses nothing."""
    try:
        with pg_connect(conninfo, "tpx-migrate", autocommit=False) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(schema),))
            outcome, extension_schema = _hypertable(conn, schema)
            if outcome.storage == "hypertable":
                outcome.policies = _policies(conn, schema, extension_schema, compress_after, retain_for)
            conn.commit()
    except _SessionEndedError as exc:
        return _Storage("table", str(exc), exc.hint)
    except psycopg.OperationalError as exc:  # the connection dropped between statements
        return _Storage("table", f"the PostgreSQL session ended: {first_line(exc)}", HINT_RETRY)
    if outcome.storage != "hypertable" and (compress_after or retain_for):
        outcome.policies = [POLICIES_IGNORED]
    return outcome


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
    """Apply pending migrations to ``schema``, then the TimescaleDB step; safe to run concurrently."""
    report = MigrationReport(schema=schema)
    migrations = load_migrations()
    with pg_connect(conninfo, "tpx-migrate", autocommit=False) as conn:
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
        report.current_version = max([*applied, *(m.version for m in migrations)], default=0)
        conn.commit()
    outcome = _timescale(conninfo, schema, compress_after, retain_for)
    report.storage, report.storage_reason, report.storage_hint = outcome.storage, outcome.reason, outcome.hint
    report.policies = outcome.policies
    return report


def migrate_for(settings: Settings) -> MigrationReport:
    """Migrate with every setting migrations use and log the outcome: `tpx migrate` and `tpx serve`."""
    report = migrate(settings.database_url, settings.db_schema, settings.compress_after, settings.retain_for)
    for name in report.applied:
        log.info("applied migration %s", name)
    summary = f"schema {report.schema} at version {report.current_version}; {report.storage_line()}"
    if report.storage_hint:
        log.warning("%s; %s", summary, report.storage_hint)
    else:
        log.info("%s", summary)
    for policy in report.policies:
        failed = policy == POLICIES_IGNORED or " FAILED: " in policy
        log.log(logging.WARNING if failed else logging.INFO, "timescaledb: %s", policy)
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


class SchemaBehind(Exception):  # noqa: N818 (the CLI catches it by this name)
    """tpx's schema is missing or older than this tpx (one line naming the fix)."""


def require_current(
    conn: psycopg.Connection[tuple[object, ...]], schema: str, advice: str = "TPX_DB_SCHEMA"
) -> None:
    """Raise :class:`SchemaBehind` unless ``schema`` holds every migration of this tpx (the
    commands that read tpx's own tables, ``tpx_domain_devices`` included, check this first);
    ``advice`` follows "run `tpx migrate`" in the message."""
    version = current_version(conn, schema)
    if version is None or version < latest_version():
        raise SchemaBehind(
            f"schema {schema} is at version {version or 0}, this tpx needs {latest_version()}: "
            f"run `tpx migrate` ({advice})"
        )
