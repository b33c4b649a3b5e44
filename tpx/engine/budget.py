"""Memory bounds in bytes: how many entries to ask for, where a batch ends, a queue that counts bytes.

Redis cannot limit an XREADGROUP/XAUTOCLAIM reply by bytes, only by COUNT, so :class:`PageSize`
adapts the count to the records seen: ``page_bytes // largest record of the last page``. The
re-read of own pending entries after a (re)start and each claim sweep start from one entry and
count every record as at least ``max_record_bytes``: the page an OOM-killed instance died on is
never read again many large records at a time (that crash-looped it).

Records of up to :data:`~tpx.records.SMALL_RECORD_BYTES` are not measured one by one (the
decoder's hot loop pays one comparison for them): each counts as that many bytes, an upper
bound, so the common record never reaches a byte budget before the count bounds do.
"""

from __future__ import annotations

import queue
import time
from typing import Final

from tpx.config import Settings
from tpx.engine.batch import Batch
from tpx.records import SMALL_RECORD_BYTES, Position


class PageSize:
    """The COUNT for the next read: as many entries as ``page_bytes`` holds at the last page's sizes.

    While ``cautious`` (the re-read of own pending entries, a claim sweep: entries that may be
    what crashed an instance) a record counts as at least ``max_record_bytes``, and the first
    page is one entry, so such a page stays within the budget for any records up to that size.
    Otherwise a record counts as at least SMALL_RECORD_BYTES (defaults: read_count pages of
    small records).
    """

    def __init__(self, page_bytes: int, read_count: int, max_record_bytes: int) -> None:
        self.page_bytes = page_bytes
        self.read_count = read_count
        self.max_record_bytes = max_record_bytes
        self.cautious = True
        self.count = 1

    def restart(self) -> None:
        """Read cautiously, from one entry: nothing is known about what comes next."""
        self.cautious = True
        self.count = 1

    def relax(self) -> None:
        """Leave the cautious reads (own pending entries re-read): from the next page on, size
        pages by what was seen (the next one is still sized cautiously: nothing seen yet)."""
        self.cautious = False

    def seen(self, largest: int) -> None:
        """A page was read whose longest ``record`` was ``largest`` bytes (0: all small, or none)."""
        floor = self.max_record_bytes if self.cautious else SMALL_RECORD_BYTES
        self.count = max(1, min(self.page_bytes // max(largest, floor), self.read_count))


def record_bytes(positions: list[Position]) -> list[int]:
    """What each position counts for in a byte budget (its stored ``io``, at least SMALL_RECORD_BYTES)."""
    return [max(len(p.attributes_jsonb), SMALL_RECORD_BYTES) for p in positions]


def cut(sizes: list[int] | None, available: int, max_count: int, max_bytes: int) -> tuple[int, int]:
    """How many of the first ``available`` positions make the next batch, and their bytes.

    ``sizes`` lists each position's bytes, or is None when all are small (SMALL_RECORD_BYTES
    each). A batch holds at most ``max_count`` positions and ``max_bytes`` bytes, and at least one.
    """
    if sizes is None:
        n = max(1, min(available, max_count, max_bytes // SMALL_RECORD_BYTES))
        return n, n * SMALL_RECORD_BYTES
    total = 0
    n = 0
    for size in sizes[: min(available, max_count)]:
        if n and total + size > max_bytes:
            break
        total += size
        n += 1
    return n, total


class BatchQueue(queue.Queue[Batch | None]):
    """The reader-to-writers queue, bounded by batches and by the bytes of the batches it holds.

    A batch leaves the byte count when a writer takes it (a writer then holds one batch, bounded
    by the batch byte bound). One batch is always let in, however large, so nothing wedges.

    It also counts the writers waiting in :meth:`get` (idle ones): :meth:`writer_idle` tells the
    reader that a batch it hands over now is written at once (smart batching).
    """

    def __init__(self, maxsize: int, max_bytes: int) -> None:
        super().__init__(maxsize)
        self.max_bytes = max_bytes
        self.nbytes = 0
        #: callers inside :meth:`get` that have not taken a batch yet
        self.waiting = 0

    def get(self, block: bool = True, timeout: float | None = None) -> Batch | None:
        with self.mutex:
            self.waiting += 1
        try:
            return super().get(block, timeout)
        except queue.Empty:
            with self.mutex:
                self.waiting -= 1
            raise

    def writer_idle(self) -> bool:
        """A writer waits with nothing queued for it: a batch queued now is taken at once."""
        return self.waiting > self._qsize()  # a glance: a stale answer costs one read's wait

    def _put(self, item: Batch | None) -> None:
        if item is not None:
            self.nbytes += item.nbytes
        super()._put(item)

    def _get(self) -> Batch | None:
        self.waiting -= 1  # under the mutex, in get(): this caller is busy from now on
        item = super()._get()
        if item is not None:
            self.nbytes -= item.nbytes
        return item

    def put_batch(self, batch: Batch, timeout: float) -> None:
        """Queue ``batch``, waiting up to ``timeout`` seconds while the queue is full by count or
        bytes; raises :class:`queue.Full` when it stays full."""
        deadline = time.monotonic() + timeout
        with self.not_full:
            while self._qsize() >= self.maxsize or (
                self.nbytes and self.nbytes + batch.nbytes > self.max_bytes
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise queue.Full
                self.not_full.wait(remaining)
            self._put(batch)
            self.unfinished_tasks += 1
            self.not_empty.notify()


#: What the process holds besides records (interpreter, libraries, connections, caches, the
#: allocator's slack): `tpx serve` idles at ~75 MB RSS.
BASE_RSS_BYTES: Final = 120 << 20
#: Copies of one record alive while it is parsed and serialised (raw text, parsed objects, the
#: serialised attributes and their jsonb form) or formatted for COPY by each writer.
RECORD_COPIES: Final = 4


def memory_bound(s: Settings) -> int:
    """The documented RSS bound (README "Memory"), for records up to ``max_record_bytes``.

    One page as read and once more decoded, the open batch, the queue, one batch per writer
    (a batch holds at least one record), and the transient copies of the records being
    decoded and copied.
    """
    batch = max(s.queue_bytes // s.queue_batches, s.max_record_bytes)
    return (
        BASE_RSS_BYTES
        + 2 * max(s.page_bytes, s.max_record_bytes)
        + batch
        + max(s.queue_bytes, batch)
        + s.writers * batch
        + (1 + s.writers) * RECORD_COPIES * s.max_record_bytes
    )
