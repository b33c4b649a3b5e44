"""Dead letters (CONTRACT.md §3): the original fields verbatim plus ``dlq_*``.

The one home of the dead-letter vocabulary: the field names, the stages and what a replay
can come to, read by the engine (which writes dead letters) and the ops commands (which read,
replay and drain them). The original entry is acknowledged only after its dead letter was
added, so a crash in between may leave a dead letter twice but never loses one.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import redis

from tpx.streams import dlq_stream

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

_SOURCE_ID = SOURCE_ID.encode()
_STAGE = STAGE.encode()
_ERROR = ERROR.encode()
_DELIVERIES = DELIVERIES.encode()
_CONSUMER = CONSUMER.encode()
_AT = AT.encode()


@dataclass(slots=True)
class DeadLetter:
    entry_id: bytes
    fields: Mapping[bytes, bytes]
    stage: Stage
    error: str
    deliveries: int = 1

    def to_fields(self, consumer: str, at_ms: int | None = None) -> dict[bytes, bytes | str]:
        out: dict[bytes, bytes | str] = dict(self.fields)
        out[_SOURCE_ID] = self.entry_id
        out[_STAGE] = self.stage.value
        out[_ERROR] = " ".join(self.error.split())  # one line, always
        out[_DELIVERIES] = str(self.deliveries)
        out[_CONSUMER] = consumer
        out[_AT] = str(at_ms if at_ms is not None else int(time.time() * 1000))
        return out


def add_dead_letters(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    letters: Sequence[DeadLetter],
) -> tuple[list[DeadLetter], redis.ResponseError | None]:
    """Add each dead letter, then acknowledge the originals of those Redis took.

    Returns the letters Redis refused (``OOM``, ``READONLY``, ``WRONGTYPE`` on the DLQ key,
    ``LOADING``) with the first refusal: their originals are not acknowledged, so they stay
    pending. Connection errors propagate (then nothing after the failure was acknowledged).
    """
    if not letters:
        return [], None
    pipe = client.pipeline(transaction=False)
    for letter in letters:
        pipe.xadd(dlq_stream(stream), letter.to_fields(consumer))  # type: ignore[arg-type]
    results = pipe.execute(raise_on_error=False)
    refused = [
        letter for letter, r in zip(letters, results, strict=True) if isinstance(r, redis.ResponseError)
    ]
    added = [
        letter.entry_id
        for letter, r in zip(letters, results, strict=True)
        if not isinstance(r, redis.ResponseError)
    ]
    if added:
        client.xack(stream, group, *added)
    error = next((r for r in results if isinstance(r, redis.ResponseError)), None)
    return refused, error


def dead_letter(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    letters: Sequence[DeadLetter],
) -> None:
    """Add the dead letters and acknowledge their originals; raise if Redis refused any.

    The originals of refused letters are not acknowledged (those added are).
    """
    _, error = add_dead_letters(client, stream, group, consumer, letters)
    if error is not None:
        raise error
