"""What a database error means for the writer: the row's fault, the database's, or the query's.

Decided by SQLSTATE (the error's class, its first two characters), not by psycopg's
exception class: psycopg raises ``ProgramLimitExceeded`` (class 54, e.g. ``string too long
to represent as jsonb string``) as an ``OperationalError``, the same base class as a lost
connection, yet retrying the same row can never help it.
"""

from __future__ import annotations

import enum

import psycopg

from tpx.errors import first_line


class Fault(enum.Enum):
    """Who is at fault, i.e. what the writer does about it."""

    #: The rows themselves are refused: isolate them by splitting, dead-letter as ``write``.
    ROW = "row"
    #: The database (or the way to it) is unwell: retry with back-off, the rows are fine.
    TRANSIENT = "transient"
    #: The server cannot run the query as written (schema changed, privilege missing, feature
    #: unsupported): retry with back-off, but the instance is not ready and an alert fires.
    QUERY = "query"


#: SQLSTATE classes whose errors are about the values of a row.
#: 22 data exception, 23 integrity constraint violation, 54 program limit exceeded (a value too
#: large for its type), 2F/38/39 a routine (a trigger's) refused it, P0 a PL/pgSQL RAISE.
ROW_CLASSES = frozenset({"22", "23", "54", "2F", "38", "39", "P0"})
#: SQLSTATE classes of a query the server cannot run: 42 syntax error or access rule violation
#: (undefined column, table, privilege), 0A feature not supported, 3F invalid schema name.
QUERY_CLASSES = frozenset({"42", "0A", "3F"})


def classify(exc: psycopg.Error) -> Fault:
    """The fault behind ``exc``; anything not known to be the row's or the query's is retried.

    Retrying is the safe default (nothing is lost, nothing acknowledged): 08 connection,
    53 insufficient resources, 57 operator intervention (shutdown, statement timeout), 40
    deadlock or serialization, 55 lock not available, 25 a read-only (standby) transaction,
    58/XX system and internal errors. Without an SQLSTATE the error is client-side: a lost
    connection or a pool timeout (retried), a value psycopg itself cannot send (the row's), or
    a misuse of the client API (the query's).
    """
    state = exc.sqlstate
    if state is None:
        if isinstance(exc, psycopg.DataError):
            return Fault.ROW
        if isinstance(exc, (psycopg.ProgrammingError, psycopg.NotSupportedError, psycopg.InterfaceError)):
            return Fault.QUERY
        return Fault.TRANSIENT
    klass = state[:2]
    if klass in ROW_CLASSES:
        return Fault.ROW
    if klass in QUERY_CLASSES:
        return Fault.QUERY
    return Fault.TRANSIENT


#: The longest reason ``describe`` returns (characters): room for the message, its DETAIL and
#: the CONTEXT that names the column and the value, yet one readable log line and DLQ field.
MAX_REASON_CHARS = 400


def describe(exc: psycopg.Error) -> str:
    """One line: the error's class and message, then PostgreSQL's DETAIL and CONTEXT.

    ``UntranslatableCharacter: unsupported Unicode escape sequence`` alone does not say which
    value; the DETAIL (``\\u0000 cannot be converted to text.``) and the CONTEXT (``JSON data,
    line 1: {"s": "nul\\u0000...`` / ``COPY positions, line 1, column attributes``) do.
    """
    diag = exc.diag
    text = diag.message_primary or first_line(exc)
    parts = [f"{type(exc).__name__}: {text}"]
    if diag.message_detail:
        parts.append(f"DETAIL: {diag.message_detail}")
    if diag.context:
        parts.append("CONTEXT: " + " / ".join(line for line in diag.context.splitlines() if line.strip()))
    line = " ".join("; ".join(parts).split())
    if len(line) > MAX_REASON_CHARS:
        line = line[: MAX_REASON_CHARS - 1] + "…"
    return line
