"""Names fixed by CONTRACT.md (docs/CONTRACT.md) that more than one layer reads.

The dead-letter vocabulary (§3): the ``dlq_*`` field names, the stages, and what replaying one
can come to. The engine writes dead letters (:mod:`tpx.engine.deadletter`), the ops commands
read, replay and drain them (:mod:`tpx.ops.dlq`); both spell the names from here. Plain values
only: importing this loads nothing else.
"""

from __future__ import annotations

import enum
from typing import Final, Literal

#: Every field a dead letter adds to the original entry's starts with this (a replay drops them).
FIELD_PREFIX: Final = "dlq_"
#: The original entry's stream id.
SOURCE_ID: Final = "dlq_source_id"
#: Where it failed: a :class:`Stage`.
STAGE: Final = "dlq_stage"
#: A one-line reason naming the offending field or value.
ERROR: Final = "dlq_error"
#: How many times it was delivered before it was dead-lettered.
DELIVERIES: Final = "dlq_deliveries"
#: The consumer that dead-lettered it.
CONSUMER: Final = "dlq_consumer"
#: Epoch milliseconds when it was dead-lettered.
AT: Final = "dlq_at"


class Stage(enum.StrEnum):
    """Where a record failed (``dlq_stage``, and the ``stage`` label of the metrics)."""

    #: not a valid record by the contract
    DECODE = "decode"
    #: the database refused it
    WRITE = "write"


STAGE_DECODE: Final = Stage.DECODE
STAGE_WRITE: Final = Stage.WRITE

#: What a replay of one dead letter came to (``tpx dlq replay``): done, refused because it was
#: replayed too often already, not found, or, under ``--dry-run``, what would happen.
ReplayOutcome = Literal["replayed", "refused", "missing", "would-replay", "would-refuse"]
