"""Process exit codes, one name each (a container's restart policy reads them)."""

from typing import Final

#: Clean exit, including a graceful stop on SIGTERM/SIGINT.
OK: Final = 0
#: An unexpected error in a one-shot command.
ERROR: Final = 1
#: Bad flag, bad setting or bad argument: fix the invocation, do not retry.
USAGE: Final = 2
#: Redis or Postgres unreachable (or refusing us) at start-up: retry later.
UNAVAILABLE: Final = 3
#: A second SIGTERM/SIGINT forced an immediate exit; queued batches stay pending.
FORCED: Final = 4
#: A thread crashed (a bug): panic dump written; the restart policy should restart us.
CRASH: Final = 70
