"""Process exit codes, one name each (a container's restart policy reads them).

The rule the restart policy relies on: 3 means "a dependency did not answer, retrying may
work"; 2 means "it answered no, fix the setup" (a retry loop would fail the same way for
ever). :func:`postgres_connect_failure` applies that rule to a failed PostgreSQL connect,
for ``tpx serve`` and for the one-shot commands alike.
"""

from __future__ import annotations

import re
from typing import Final

from tpx.config import mask_url
from tpx.errors import first_line

#: Clean exit, including a graceful stop on SIGTERM/SIGINT.
OK: Final = 0
#: An unexpected error in a one-shot command.
ERROR: Final = 1
#: Bad flag, setting or argument, or a setup the servers refuse (no such database or role, wrong
#: password, a taken port, a key of the wrong type): fix it, do not retry.
USAGE: Final = 2
#: Redis or Postgres does not answer at start-up (or the schema awaits `tpx migrate`): retry later.
UNAVAILABLE: Final = 3
#: A second SIGTERM/SIGINT (after the signal window) forced an immediate exit; queued batches
#: stay pending.
FORCED: Final = 4
#: A thread crashed (a bug): panic dump written; the restart policy should restart us.
CRASH: Final = 70

#: SQLSTATEs of a connect the server refused for good: invalid_catalog_name (no such database),
#: invalid_authorization_specification (no such role, no pg_hba.conf entry, login not allowed),
#: invalid_password.
SETUP_SQLSTATES: Final = frozenset({"3D000", "28000", "28P01"})
#: What libpq reports for them. psycopg 3.3 gives no SQLSTATE for a failed connect (``sqlstate``
#: is None; only the server's FATAL text in the message), so the text is what there is; the
#: client-side ones (no password given) are the setup's fault as well.
SETUP_MESSAGES: Final = re.compile(
    r'FATAL:\s+(database ".*" does not exist'
    r'|role ".*" does not exist'
    r"|password authentication failed"
    r"|no pg_hba\.conf entry"
    r'|role ".*" is not permitted to log in'
    r"|Peer authentication failed|Ident authentication failed)"
    r"|fe_sendauth: no password supplied"
)


def postgres_connect_failure(exc: BaseException, dsn: str | None) -> tuple[int, str]:
    """The exit code and the one line for a PostgreSQL connect that failed with ``exc``."""
    text = str(exc)
    sqlstate = getattr(exc, "sqlstate", None)
    where = mask_url(dsn) if dsn else "the configured address"
    match = SETUP_MESSAGES.search(text)
    if sqlstate in SETUP_SQLSTATES or match is not None:
        reason = match.group(0).removeprefix("FATAL:").strip() if match else first_line(exc)
        return USAGE, f"PostgreSQL at {where} refused tpx: {mask_url(reason)} (fix TPX_DATABASE_URL)"
    return UNAVAILABLE, f"cannot reach PostgreSQL at {where}: {mask_url(first_line(exc))}"
