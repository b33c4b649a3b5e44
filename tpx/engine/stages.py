"""The one narrow interface through which domain logic plugs into the pipeline.

The core path (decode -> write -> ack) knows nothing of geofences, trip timing
or alerts. Such stages implement :class:`PostCommitStage` and are handed to the
engine; a writer calls each of them after a batch has been committed and
acknowledged, with what was written. A stage that raises is logged and counted
(``tpx_stage_errors_total{stage=...}``) and never disturbs the pipeline; a slow
stage slows its writer, so a stage that does I/O should queue work of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tpx.records import Position


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
