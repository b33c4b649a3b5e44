"""What travels on the queue from the reader to the writers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tpx.records import Position


@dataclass(slots=True)
class Batch:
    """Decoded positions read together, plus what the writer needs to finish them."""

    positions: list[Position] = field(default_factory=list)
    #: ``time.monotonic()`` when the oldest record joined the batch.
    started: float = field(default_factory=time.monotonic)
    #: Delivery counts of redelivered entries (absent: 1); used for write-stage dead letters.
    deliveries: dict[bytes, int] = field(default_factory=dict)
    #: The positions' entry ids, in order, when the reader already listed them (else None).
    ids: list[bytes] | None = None
    #: What the positions count for in the queue's byte budget (tpx.engine.budget).
    nbytes: int = 0

    def entry_ids(self) -> list[bytes]:
        """The positions' entry ids, in order (listed once per batch)."""
        if self.ids is None:
            self.ids = [p.entry_id for p in self.positions]
        return self.ids

    def __len__(self) -> int:
        return len(self.positions)
