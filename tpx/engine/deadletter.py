"""Dead letters (CONTRACT.md §3): the original fields verbatim plus ``dlq_*``.

Writing them is the engine's; their vocabulary (field names, stages, replay outcomes) lives in
:mod:`tpx.contract`, shared with the ops commands that read, replay and drain them. The original
entry is acknowledged only after its dead letter was added, so a crash in between may leave a
dead letter twice but never loses one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis

from tpx.contract import AT, CONSUMER, DELIVERIES, ERROR, SOURCE_ID, STAGE, Stage

__all__ = ["DeadLetter", "Stage", "add_dead_letters", "dead_letter"]
from tpx.streams import dlq_stream

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
