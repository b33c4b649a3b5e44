"""Intake: a page of stream entries -> positions, dead letters and vanished ids.

Two steps that return values, shared by the reader thread (``tpx serve``) and ``tpx claim``:

* :func:`take_in` decodes a page as Redis sent it into an :class:`Intake`: the valid positions,
  a decode-stage dead letter for each poison record, the ids deleted from the stream while
  pending, the page's largest record and the delivery counts a write-stage dead letter needs;
* :func:`settle` adds those dead letters (acknowledging their originals) and acknowledges the
  vanished ids, and says what it did in a :class:`Settled`.

The delivery-count rule lives here once: an entry's count is what XPENDING says it was
delivered, counting the delivery being processed (:func:`delivery_counts`); an entry with no
count (a first delivery, read with ``>``) was delivered once (:data:`FIRST_DELIVERY`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

import redis

from tpx.config import Settings
from tpx.engine.deadletter import DeadLetter, Stage, add_dead_letters
from tpx.records import Position, decode_page

#: Entries as Redis sends them: (id, [name, value, ...]); fields None: deleted while pending.
Entries = Sequence[tuple[bytes, list[bytes] | None]]

#: The delivery count of an entry XPENDING was not asked about: it was read once, with ``>``.
FIRST_DELIVERY: Final = 1
#: The stream commands whose replies :func:`raw_replies` leaves as Redis sent them.
RAW_COMMANDS: Final = ("XREADGROUP", "XAUTOCLAIM", "XCLAIM")


def _as_sent(response: Any, **options: Any) -> Any:
    return response


def raw_replies(client: redis.Redis) -> redis.Redis:
    """A sibling of ``client`` (same connection pool) whose stream reads come back as sent.

    redis-py's parsing builds a dict per entry; without it, reading a page costs 7.6k instead
    of 13.0k instructions per entry (callgrind), the fields read in place by the decoder.
    """
    raw = redis.Redis(connection_pool=client.connection_pool)
    for command in RAW_COMMANDS:
        raw.set_response_callback(command, _as_sent)
    return raw


def read_entries(reply: Any) -> Entries:
    """The entries of a raw XREADGROUP reply for one stream (none: ``[]``)."""
    if not reply:
        return []
    # RESP3: {stream: entries}; RESP2: [[stream, entries]]
    if isinstance(reply, dict):
        return cast(Entries, next(iter(reply.values())))
    return cast(Entries, reply[0][1])


def fields_dict(flat: list[bytes]) -> dict[bytes, bytes]:
    """An entry's flat field list (name, value, ...) as a dict, for its dead letter."""
    pairs = iter(flat)
    return dict(zip(pairs, pairs, strict=False))


def delivery_counts(pending: Iterable[Mapping[str, Any]], claiming: bool = False) -> dict[bytes, int]:
    """Each entry's delivery count, counting the delivery being processed, from XPENDING rows.

    ``claiming``: the rows were read before an XCLAIM that delivers each entry once more.
    """
    more = 1 if claiming else 0
    return {cast(bytes, row["message_id"]): int(row["times_delivered"]) + more for row in pending}


@dataclass(slots=True)
class Intake:
    """What a page of entries holds."""

    #: the valid records, in the page's order
    positions: list[Position] = field(default_factory=list)
    #: decode-stage dead letters for the poison records
    dead_letters: list[DeadLetter] = field(default_factory=list)
    #: ids whose entries were deleted from the stream while pending (to acknowledge)
    vanished: list[bytes] = field(default_factory=list)
    #: the page's longest ``record`` field in bytes, when above SMALL_RECORD_BYTES (else 0)
    largest: int = 0
    #: delivery counts of the positions, when the page was redelivered (absent: FIRST_DELIVERY)
    deliveries: dict[bytes, int] = field(default_factory=dict)
    #: entries the page held
    entries: int = 0


def take_in(
    entries: Entries,
    settings: Settings,
    now_us: int,
    deliveries: Mapping[bytes, int] | None = None,
) -> Intake:
    """Decode a page (``deliveries``: counts from :func:`delivery_counts`, None for a first read).

    One call per page: the decoder's loop runs with no Python call per record in between.
    """
    positions: list[Position] = []
    failures, vanished, largest = decode_page(
        entries, positions, now_us, settings.max_future_s * 1_000_000, settings.max_record_bytes
    )
    counts = deliveries or {}
    letters = [
        DeadLetter(entry_id, fields_dict(flat), Stage.DECODE, error, counts.get(entry_id, FIRST_DELIVERY))
        for entry_id, flat, error in failures
    ]
    redelivered = (
        {p.entry_id: counts.get(p.entry_id, FIRST_DELIVERY) for p in positions} if deliveries else {}
    )
    return Intake(positions, letters, vanished, largest, redelivered, len(entries))


@dataclass(slots=True)
class Settled:
    """What :func:`settle` did."""

    #: dead letters added (their originals acknowledged)
    dead_lettered: list[DeadLetter] = field(default_factory=list)
    #: dead letters Redis refused (``OOM``, ``READONLY``, ...): their originals stay pending
    refused: list[DeadLetter] = field(default_factory=list)
    #: the first refusal, when there was one
    refusal: redis.ResponseError | None = None
    #: vanished ids acknowledged
    acknowledged: int = 0


def settle(
    client: redis.Redis,
    settings: Settings,
    dead_letters: Sequence[DeadLetter],
    vanished: Sequence[bytes] = (),
) -> Settled:
    """Add the dead letters and acknowledge their originals, then acknowledge the vanished ids.

    A refused dead letter's original stays pending (never acknowledged without its letter).
    Connection errors propagate.
    """
    refused, refusal = add_dead_letters(
        client, settings.stream, settings.group, settings.consumer, dead_letters
    )
    if refused:
        refused_ids = {letter.entry_id for letter in refused}
        added = [letter for letter in dead_letters if letter.entry_id not in refused_ids]
    else:
        added = list(dead_letters)
    if vanished:
        client.xack(settings.stream, settings.group, *vanished)
    return Settled(added, refused, refusal, len(vanished))
