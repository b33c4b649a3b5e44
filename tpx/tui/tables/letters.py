"""Tab 3: the newest dead letters; Enter opens one with its original record."""

from __future__ import annotations

from collections.abc import Iterable

from tpx.format import ago
from tpx.ops.dlq import DeadLetterView
from tpx.streams import entry_order
from tpx.tui.poller import Snapshot
from tpx.tui.tables.base import Column, SnapshotTable

LETTER_COLUMNS: tuple[Column[DeadLetterView], ...] = (
    Column("id", lambda x: x.id, lambda x: entry_order(x.id)),
    Column("stage", lambda x: x.stage),
    Column("device", lambda x: x.device_id),
    Column("deliveries", lambda x: str(x.deliveries), lambda x: x.deliveries),
    Column("replays", lambda x: str(x.replays), lambda x: x.replays),
    Column("age", lambda x: ago(x.age_s), lambda x: x.age_s),
    Column("error", lambda x: x.error),
)


class LettersTable(SnapshotTable[DeadLetterView]):
    TAB = "letters"
    TITLE = "Dead letters"
    COLUMNS = LETTER_COLUMNS

    def items(self, snap: Snapshot) -> Iterable[DeadLetterView]:
        return snap.letters

    def key(self, item: DeadLetterView) -> str:
        return item.id

    def letter(self, entry_id: str) -> DeadLetterView | None:
        return next((x for x in self.snapshot.letters if x.id == entry_id), None)
