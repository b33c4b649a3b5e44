"""`tpx migrate --dry-run`: the migrations a schema lacks, read without changing anything."""

from __future__ import annotations

import psycopg
from psycopg import sql

from tpx.connections import pg_connect
from tpx.schema import MIGRATIONS_TABLE, load_migrations


def pending_migrations(conninfo: str, schema: str) -> list[str]:
    """The migrations ``schema`` has not applied yet (all of them when tpx never migrated it)."""
    with pg_connect(conninfo, "tpx-migrate-dry-run", autocommit=True) as conn:
        try:
            applied = {
                int(str(row[0]))
                for row in conn.execute(
                    sql.SQL("SELECT version FROM {}.{}").format(
                        sql.Identifier(schema), sql.Identifier(MIGRATIONS_TABLE)
                    )
                ).fetchall()
            }
        except psycopg.errors.UndefinedTable:  # also a missing schema: the table is not there
            applied = set()
    return [f"{m.version:03d}_{m.name}" for m in load_migrations() if m.version not in applied]
