"""The dashboard's tabs, one table widget each, in tab order (keys 1-5)."""

from __future__ import annotations

from typing import Any

from tpx.tui.tables.base import SnapshotTable
from tpx.tui.tables.devices import DevicesTable
from tpx.tui.tables.instances import InstancesTable
from tpx.tui.tables.letters import LettersTable
from tpx.tui.tables.pending import PendingTable
from tpx.tui.tables.timing import TimingTable

TABLES: tuple[type[SnapshotTable[Any]], ...] = (
    InstancesTable,
    PendingTable,
    LettersTable,
    DevicesTable,
    TimingTable,
)

__all__ = [
    "TABLES",
    "DevicesTable",
    "InstancesTable",
    "LettersTable",
    "PendingTable",
    "SnapshotTable",
    "TimingTable",
]
