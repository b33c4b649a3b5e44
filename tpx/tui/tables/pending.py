"""Tab 2: the oldest pending entries (delivered, not yet acknowledged)."""

from __future__ import annotations

from collections.abc import Iterable

from tpx.format import ago
from tpx.ops.inspect import PendingEntry
from tpx.streams import entry_order
from tpx.tui.poller import Snapshot
from tpx.tui.tables.base import Column, SnapshotTable

PENDING_COLUMNS: tuple[Column[PendingEntry], ...] = (
    Column("id", lambda p: p.id, lambda p: entry_order(p.id)),
    Column("consumer", lambda p: p.consumer),
    Column("idle", lambda p: ago(p.idle_ms / 1000), lambda p: p.idle_ms),
    Column("deliveries", lambda p: str(p.deliveries), lambda p: p.deliveries),
    Column("age", lambda p: ago(p.age_s), lambda p: p.age_s),
)


class PendingTable(SnapshotTable[PendingEntry]):
    TAB = "pending"
    TITLE = "Pending"
    COLUMNS = PENDING_COLUMNS

    def items(self, snap: Snapshot) -> Iterable[PendingEntry]:
        return snap.oldest_pending

    def key(self, item: PendingEntry) -> str:
        return item.id
