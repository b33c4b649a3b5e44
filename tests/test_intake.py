"""Intake, called directly on pages Redis really sent: positions, poison, vanished, delivery counts."""

from __future__ import annotations

import json

import redis

from tests.helpers import NOW_MS, add_entries, pending_count, record, xpending_range, xrange
from tpx.config import Settings
from tpx.engine.deadletter import Stage
from tpx.engine.intake import delivery_counts, raw_replies, read_entries, settle, take_in
from tpx.engine.reader import ensure_group

NOW_US = NOW_MS * 1000


def read(client: redis.Redis, s: Settings, cursor: str) -> list[tuple[bytes, list[bytes] | None]]:
    """One page as the reader gets it (``>``: new entries; ``0``: this consumer's pending ones)."""
    reply = raw_replies(client).xreadgroup(s.group, s.consumer, {s.stream: cursor}, count=100)
    return list(read_entries(reply))


def test_a_page_splits_into_positions_dead_letters_and_vanished_ids(
    settings: Settings, rclient: redis.Redis
) -> None:
    s = settings
    ensure_group(rclient, s.stream, s.group)
    ids = add_entries(
        rclient,
        s.stream,
        [
            record("in-1", ts=NOW_MS - 5_000),
            {"device_id": "in-1", "record": json.dumps({"ts": NOW_MS, "lat": 91, "lon": 1}), "x": "kept"},
            record("in-2", ts=NOW_MS - 4_000),
            record("gone", ts=NOW_MS - 3_000),
        ],
    )
    read(rclient, s, ">")  # delivered once: pending
    rclient.xdel(s.stream, ids[3])  # deleted while pending: Redis sends its id with no fields

    intake = take_in(read(rclient, s, "0"), s, NOW_US)

    assert [p.entry_id for p in intake.positions] == [ids[0], ids[2]]
    assert [p.device_id for p in intake.positions] == ["in-1", "in-2"]
    [letter] = intake.dead_letters
    assert (letter.entry_id, letter.stage, letter.error) == (
        ids[1],
        Stage.DECODE,
        "record.lat out of range -90..90: 91",
    )
    assert letter.fields[b"x"] == b"kept" and letter.deliveries == 1
    assert intake.vanished == [ids[3]] and intake.entries == 4
    assert intake.largest == 0 and intake.deliveries == {}  # small records; no counts asked for

    settled = settle(rclient, s, intake.dead_letters, intake.vanished)

    assert [x.entry_id for x in settled.dead_lettered] == [ids[1]] and settled.refused == []
    assert settled.refusal is None and settled.acknowledged == 1
    [(_, dead)] = xrange(rclient, s.dlq_stream)
    assert dead[b"dlq_source_id"] == ids[1] and dead[b"dlq_stage"] == b"decode" and dead[b"x"] == b"kept"
    remaining = {r["message_id"] for r in xpending_range(rclient, s.stream, s.group, 10)}
    assert remaining == {ids[0], ids[2]}  # valid records wait for their commit


def test_redelivered_entries_carry_their_delivery_counts(settings: Settings, rclient: redis.Redis) -> None:
    s = settings
    ensure_group(rclient, s.stream, s.group)
    ids = add_entries(
        rclient, s.stream, [record("re", ts=NOW_MS - 5_000), {"device_id": "re", "record": "[]"}]
    )
    read(rclient, s, ">")
    page = read(rclient, s, "0")  # the second delivery of both
    pending = xpending_range(rclient, s.stream, s.group, 10, consumer=s.consumer)

    counts = delivery_counts(pending)
    intake = take_in(page, s, NOW_US, counts)

    assert counts == {ids[0]: 2, ids[1]: 2}
    assert intake.deliveries == {ids[0]: 2}
    [letter] = intake.dead_letters
    assert letter.entry_id == ids[1] and letter.deliveries == 2
    assert letter.error == "record must be a JSON object, got []"
    # read before an XCLAIM, the rows count the delivery the claim is about to make
    assert delivery_counts(pending, claiming=True) == {ids[0]: 3, ids[1]: 3}
    assert pending_count(rclient, s.stream) == 2


def test_a_record_over_the_size_limit_is_a_dead_letter_unparsed(
    settings: Settings, rclient: redis.Redis
) -> None:
    s = settings.model_copy(update={"max_record_bytes": 8192})
    ensure_group(rclient, s.stream, s.group)
    big = record("big", ts=NOW_MS - 1_000, io={"pad": "x" * 10_000})
    mid = record("mid", ts=NOW_MS - 2_000, io={"pad": "y" * 6_000})
    ids = add_entries(rclient, s.stream, [mid, big])

    intake = take_in(read(rclient, s, ">"), s, NOW_US)

    assert [p.entry_id for p in intake.positions] == [ids[0]]
    [letter] = intake.dead_letters
    assert letter.entry_id == ids[1]
    assert (
        letter.error
        == f"record is {len(big['record'])} bytes, more than the 8192 allowed (TPX_MAX_RECORD_BYTES)"
    )
    assert intake.largest == len(big["record"])
