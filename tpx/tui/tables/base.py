"""A dashboard table: one tab, its columns, and its rows built from a :class:`Snapshot`.

Each table declares its :class:`Column` s once: how a column shows an item (text) and how it
orders it (a typed value: seconds, counts, stream-id order; never the rendered text, where
"10m00s" would sort before "5m00s"). The base class does the rest the same way for every tab:
filter, sort (a header click or ``s``/``S``), and keep the cursor on the same row across refreshes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from textual.binding import Binding, BindingType
from textual.widgets import DataTable

from tpx.tui.poller import Snapshot

if TYPE_CHECKING:
    from _typeshed import SupportsRichComparison

T = TypeVar("T")

#: Marks on the sorted column's header, readable without colour.
ASCENDING, DESCENDING = " ▲", " ▼"


@dataclass(frozen=True)
class Column(Generic[T]):
    """One column: its header, its cell text, and its sort value (None: unknown, sorted last).

    Without ``order`` a column sorts by its text: right for names, stages and errors only."""

    label: str
    cell: Callable[[T], str]
    order: Callable[[T], SupportsRichComparison | None] | None = None
    #: More of the header, found when the header is drawn: ``time (EET)``, the zone the timing
    #: tab shows its times in. The column's key stays ``label``.
    detail: Callable[[], str] | None = None

    def value(self, item: T) -> SupportsRichComparison | None:
        return self.cell(item) if self.order is None else self.order(item)

    def header(self) -> str:
        return self.label if self.detail is None else f"{self.label} ({self.detail()})"


@dataclass(frozen=True)
class Row:
    """A table row: the key the cursor follows, the cells shown, and one sort value per column."""

    key: str
    cells: tuple[str, ...]
    order: tuple[SupportsRichComparison | None, ...]


@dataclass(frozen=True)
class Sort:
    column: int
    reverse: bool = False


class SnapshotTable(DataTable[str], Generic[T]):
    """The table of one tab. Subclasses say what a row is; rendering, filter and sort live here."""

    #: The tab's id (also this widget's id) and its label.
    TAB: ClassVar[str]
    TITLE: ClassVar[str]
    COLUMNS: ClassVar[tuple[Column[Any], ...]]

    BINDINGS: ClassVar[list[BindingType]] = [
        # one footer entry for both, so the footer still fits 80 columns
        Binding("s", "cycle_sort", "sort", key_display="s/S"),
        Binding("S", "reverse_sort", "reverse sort", show=False),
    ]

    def __init__(self) -> None:
        super().__init__(id=self.TAB, cursor_type="row", zebra_stripes=True)
        self.snapshot = Snapshot()
        self.needle = ""
        self.sorting: Sort | None = None  # None: the order the data came in

    # Not abc.abstractmethod: the app queries the DOM by this base class.
    def items(self, snap: Snapshot) -> Iterable[T]:
        """What this tab lists, in its natural order (the order equal rows keep when sorted)."""
        raise NotImplementedError

    def key(self, item: T) -> str:
        """The row key: what the cursor stays on across refreshes and what actions act on."""
        raise NotImplementedError

    def note(self, snap: Snapshot) -> str:
        """One line the tab shows above the table (why it is empty, say); "" for none."""
        return ""

    def build_rows(self, snap: Snapshot) -> list[Row]:
        return [
            Row(
                self.key(item),
                tuple(c.cell(item) for c in self.COLUMNS),
                tuple(c.value(item) for c in self.COLUMNS),
            )
            for item in self.items(snap)
        ]

    # --- what the app calls ---

    def show(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self._fill()

    def filter(self, needle: str) -> None:
        """Keep the rows with a cell containing ``needle`` (case-insensitive)."""
        self.needle = needle.lower()
        self._fill()

    @property
    def selected(self) -> str | None:
        """The key of the row under the cursor, if any."""
        if self.row_count == 0 or not self.is_valid_row_index(self.cursor_row):
            return None
        key = self.ordered_rows[self.cursor_row].key.value
        return None if key is None else str(key)

    def sort_by(self, column: int) -> None:
        """What a header click does: sort by that column ascending; again, descending."""
        same = self.sorting is not None and self.sorting.column == column
        self.sorting = Sort(column, reverse=same and not (self.sorting and self.sorting.reverse))
        self._fill(headers=True)

    # --- keys and clicks ---

    def action_cycle_sort(self) -> None:
        """``s``: sort by the next column, ascending; after the last, back to the natural order."""
        following = 0 if self.sorting is None else self.sorting.column + 1
        self.sorting = Sort(following) if following < len(self.COLUMNS) else None
        self._fill(headers=True)

    def action_reverse_sort(self) -> None:
        """``S``: reverse the order (unsorted: the first column, descending)."""
        self.sorting = (
            Sort(0, True) if self.sorting is None else Sort(self.sorting.column, not self.sorting.reverse)
        )
        self._fill(headers=True)

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        self.sort_by(event.column_index)

    # --- rendering ---

    def on_mount(self) -> None:
        self._headers()

    def _headers(self) -> None:
        for index, column in enumerate(self.COLUMNS):
            mark = ""
            if self.sorting is not None and self.sorting.column == index:
                mark = DESCENDING if self.sorting.reverse else ASCENDING
            self.add_column(column.header() + mark, key=column.label)

    def _fill(self, headers: bool = False) -> None:
        selected, at = self.selected, self.cursor_row
        rows = self.build_rows(self.snapshot)
        if self.needle:
            rows = [r for r in rows if any(self.needle in cell.lower() for cell in r.cells)]
        if self.sorting is not None:
            rows = ordered(rows, self.sorting)
        self.clear(columns=headers)
        if headers:
            self._headers()
        for row in rows:
            self.add_row(*row.cells, key=row.key)
        keys = [r.key for r in rows]
        if selected in keys:
            self.move_cursor(row=keys.index(selected))
        elif rows:
            self.move_cursor(row=min(at, len(rows) - 1))


def ordered(rows: list[Row], sort: Sort) -> list[Row]:
    """Rows by one column's sort value; equal rows keep their order, unknown values go last."""
    i = sort.column
    known = [(value, r) for r in rows if (value := r.order[i]) is not None]
    known.sort(key=lambda pair: pair[0], reverse=sort.reverse)  # stable, reversed too
    return [r for _, r in known] + [r for r in rows if r.order[i] is None]
