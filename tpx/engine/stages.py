"""The narrow interfaces through which domain logic plugs into the pipeline.

The core path (decode -> write -> ack) knows nothing of geofences, trip timing
or alerts. Work that must be exact across crashes implements :class:`TransactionStage`
(the domain stage: timing records commit with the positions they come from). Work
that may be lost in a crash implements :class:`PostCommitStage`: a writer calls each
of them after a batch has been committed and acknowledged, with what was written.
A stage that raises is logged and counted (``tpx_stage_errors_total{stage=...}``)
and never disturbs the pipeline; a slow stage slows its writer, so a stage that
does I/O should queue work of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from tpx.records import Position

if TYPE_CHECKING:
    import psycopg
    from prometheus_client import CollectorRegistry


@dataclass(frozen=True, slots=True)
class Committed:
    """A committed batch: rows written now, and records that were already stored."""

    inserted: Sequence[Position]
    duplicates: Sequence[Position]


class PostCommitStage(Protocol):
    #: Label for logs and the ``tpx_stage_errors_total`` metric.
    name: str

    def on_commit(self, committed: Committed) -> None:
        """Called from a writer thread, once per committed batch (possibly concurrently)."""


class StageStartError(Exception):
    """A transaction stage cannot start: one line for the user; ``usage`` when the set-up is
    wrong (exit 2: a table or column missing under TPX_DOMAIN=on), else the database does not
    answer (exit 3)."""

    def __init__(self, message: str, *, usage: bool = True) -> None:
        super().__init__(message)
        self.usage = usage


#: What a transaction stage asks the writer to do once the batch's transaction has committed
#: (update its caches and metrics); never called when the transaction rolls back.
AfterCommit = Callable[[], None]


class TransactionStage(Protocol):
    """Work that must commit with the positions it derives from, or not at all.

    The writer calls :meth:`in_transaction` in the batch's own transaction, after the rows are
    in and before COMMIT, inside a savepoint: a crash anywhere leaves both or neither, and the
    redelivered entries find their rows stored (duplicates, not passed again). A database error
    that retrying can fix (connection lost, deadlock, lock timeout) retries the whole batch; one
    that it cannot (the stage's tables refuse the query or a value) rolls back only the
    savepoint, is logged and counted, and the positions commit without the stage's work (the
    stage's :meth:`failed` then records, in the same transaction, what it must redo). A
    stage must catch its own errors per item, so that one bad device never stops the others.
    A stage that locks devices takes them in device-id order (byte-wise): the writer's retry of
    a batch device by device goes in that order too, so writers never wait on each other in a
    cycle.
    """

    #: Label for logs and the ``tpx_stage_errors_total`` metric.
    name: str

    def open(self, registry: CollectorRegistry, stop: threading.Event) -> str:
        """Connect, check, load, start its own threads (they end when ``stop`` is set); return
        the start-up log line (e.g. "domain on: ..." or "domain off: ..."). Raises
        :class:`StageStartError`."""

    def threads(self) -> Sequence[threading.Thread]:
        """Its threads, for the engine's bounded join at shutdown."""

    def in_transaction(
        self, conn: psycopg.Connection[Any], inserted: Sequence[Position]
    ) -> AfterCommit | None:
        """Called by a writer thread (possibly concurrently) with the rows inserted now."""

    def health(self) -> str | None:
        """Why the stage cannot do its work now, in one line (None: fine); shown by /readyz
        but never making the instance unready (positions still flow)."""

    def request_reload(self) -> bool:
        """Reload what the stage reads from elsewhere (the geofences) at once (a control message);
        whether it holds anything to reload."""

    def failed(self, conn: psycopg.Connection[Any], inserted: Sequence[Position], reason: str) -> None:
        """The savepoint was rolled back: forget what was assumed about these devices, and
        record (on ``conn``, in the batch's transaction, in a savepoint of its own) what must be
        redone, so that it commits with the positions. A database error that retrying can fix
        retries the batch; any other is logged, and the positions commit all the same."""
