"""Dead letters (CONTRACT.md §3): the original fields verbatim plus ``dlq_*``.

The original entry is acknowledged only after its dead letter was added, so a
crash in between may leave a dead letter twice but never loses one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis

from tpx.streams import dlq_stream

DLQ_FIELDS = (
    b"dlq_source_id",
    b"dlq_stage",
    b"dlq_error",
    b"dlq_deliveries",
    b"dlq_consumer",
    b"dlq_at",
)
STAGE_DECODE = "decode"
STAGE_WRITE = "write"


@dataclass(slots=True)
class DeadLetter:
    entry_id: bytes
    fields: Mapping[bytes, bytes]
    stage: str
    error: str
    deliveries: int = 1

    def to_fields(self, consumer: str, at_ms: int | None = None) -> dict[bytes, bytes | str]:
        out: dict[bytes, bytes | str] = dict(self.fields)
        out[b"dlq_source_id"] = self.entry_id
        out[b"dlq_stage"] = self.stage
        out[b"dlq_error"] = " ".join(self.error.split())  # one line, always
        out[b"dlq_deliveries"] = str(self.deliveries)
        out[b"dlq_consumer"] = consumer
        out[b"dlq_at"] = str(at_ms if at_ms is not None else int(time.time() * 1000))
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
