"""The decoder (contract §1): valid records, every range boundary, sentinels, poison."""

from __future__ import annotations

import base64
import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpx import records
from tpx.records import DecodeError, Position, contract_fields, decode_entry, decode_page

NOW_US = 1_795_000_000_000_000  # 2026-11-18
DAY_US = 86_400_000_000


def decode(
    record: Any, device: Any = b"356307042441013", raw: bytes | None = None, **extra: bytes
) -> Position:
    fields: dict[bytes, bytes] = {}
    if device is not None:
        fields[b"device_id"] = device
    if raw is not None:
        fields[b"record"] = raw
    elif record is not None:
        fields[b"record"] = json.dumps(record).encode()
    fields.update({k.encode(): v for k, v in extra.items()})
    return decode_entry(b"1-0", fields, now_us=NOW_US, max_future_us=DAY_US)


def base(**kw: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {"ts": 1_700_000_000_123, "lat": 54.5, "lon": 25.25}
    rec.update(kw)
    return rec


def test_minimal_record_decodes() -> None:
    p = decode(base())
    assert p.device_id == "356307042441013"
    assert p.ts_us == 1_700_000_000_123_000
    assert (p.latitude, p.longitude) == (54.5, 25.25)
    assert p.altitude is p.angle is p.speed is p.satellites is p.priority is p.event_io_id is None
    assert p.valid is True
    assert p.attributes == "{}"
    assert p.received_at_us is None


def test_full_record_decodes() -> None:
    p = decode(
        base(alt=112.5, angle=360, speed=0, satellites=255, priority=2, event_io_id=-1, io={"1": 0}),
        received_at=b"1700000000999",
    )
    assert (p.altitude, p.angle, p.speed, p.satellites, p.priority, p.event_io_id) == (
        112.5,
        360.0,
        0.0,
        255,
        2,
        -1,
    )
    assert json.loads(p.attributes) == {"1": 0}
    assert p.received_at_us == 1_700_000_000_999_000


def test_nulls_allowed_for_optional_keys() -> None:
    p = decode(
        base(alt=None, angle=None, speed=None, satellites=None, priority=None, event_io_id=None, io=None)
    )
    assert p.attributes == "{}" and p.satellites is None and p.valid


def test_unknown_keys_ignored() -> None:
    assert decode(base(colour="blue", extra={"x": 1})).valid


@pytest.mark.parametrize(
    ("ts", "expected_us"),
    [
        ("2023-11-14T22:13:20.123Z", 1_700_000_000_123_000),
        ("2023-11-14T22:13:20.123456+00:00", 1_700_000_000_123_456),
        ("2023-11-15T00:13:20+02:00", 1_700_000_000_000_000),
        ({"__bigint__": "1700000000123"}, 1_700_000_000_123_000),
        (946_684_800_000, 946_684_800_000_000),  # exactly 2000-01-01
    ],
)
def test_ts_forms(ts: Any, expected_us: int) -> None:
    assert decode(base(ts=ts)).ts_us == expected_us


@pytest.mark.parametrize(
    ("ts", "message"),
    [
        (946_684_799_999, "before 2000-01-01"),
        ("1999-12-31T23:59:59Z", "before 2000-01-01"),
        ("2023-11-14T22:13:20", "no UTC offset"),
        ("yesterday", "not an ISO-8601"),
        (1.7e12, "must be epoch milliseconds"),
        (True, "must be epoch milliseconds"),
        (None, "ts is null"),
        ((NOW_US + DAY_US) // 1000 + 1, "too far in the future"),
        ({"__bytes__": "AQID"}, "must be epoch milliseconds"),
    ],
)
def test_ts_rejected(ts: Any, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode(base(ts=ts))


def test_ts_at_the_future_bound_is_accepted() -> None:
    assert decode(base(ts=(NOW_US + DAY_US) // 1000)).ts_us == NOW_US + DAY_US


@pytest.mark.parametrize(
    ("key", "good", "bad"),
    [
        ("lat", [-90, 90, 0.0, -89.999], [-90.0001, 90.0001, "54", True, [1]]),
        ("lon", [-180, 180, 0], [-180.5, 180.0001, "25", False]),
        ("angle", [0, 360, 359.99], [-0.01, 360.01, "90"]),
        ("speed", [0, 0.0, 300], [-0.001, "fast"]),
        ("alt", [-400, 0, 9000.5], ["high", True]),
        ("satellites", [0, 255], [-1, 256, 3.0, "9"]),
        ("priority", [0, 1, 2], [-1, 3, 1.0]),
        ("event_io_id", [0, -(2**31), 2**31 - 1], [2**31, -(2**31) - 1, 1.5]),
    ],
)
def test_every_range_boundary(key: str, good: list[Any], bad: list[Any]) -> None:
    column = {"lat": "latitude", "lon": "longitude", "alt": "altitude"}.get(key, key)
    for value in good:  # stored as given (a real holds these exactly)
        assert getattr(decode(base(**{key: value})), column) == value, (key, value)
    for value in bad:
        with pytest.raises(DecodeError, match=f"record.{key}"):
            decode(base(**{key: value}))


@pytest.mark.parametrize("key", ["ts", "lat", "lon"])
def test_required_keys(key: str) -> None:
    rec = base()
    del rec[key]
    with pytest.raises(DecodeError, match=f"record.{key} is missing"):
        decode(rec)


@pytest.mark.parametrize(
    ("device", "ok"),
    [
        (b"356307042441013", True),
        (b"a" * 64, True),
        (b"9" * 64, True),
        (b"A-z.0_9:x", True),
        (b"9" * 65, False),
        ("٣".encode(), False),
        (b"", False),
        (b"a" * 65, False),
        (b"bad id", False),
        (b"caf\xc3\xa9", False),
        (None, False),
    ],
)
def test_device_id(device: bytes | None, ok: bool) -> None:
    if ok:
        assert decode(base(), device=device).device_id == device.decode()  # type: ignore[union-attr]
    else:
        with pytest.raises(DecodeError, match="device_id"):
            decode(base(), device=device)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "record: not valid JSON"),
        (b"not json", "record: not valid JSON"),
        (b"{", "record: not valid JSON"),
        (b'{"ts": NaN, "lat": 1, "lon": 1}', "record: not valid JSON"),  # JSON has no NaN
        (b"\xff\xfe", "record: not valid JSON"),  # not UTF-8
        (b"[1,2]", r"record must be a JSON object, got \[1, 2\]"),
        (b'"str"', 'record must be a JSON object, got "str"'),
        (b"null", "record must be a JSON object, got null"),
    ],
)
def test_record_must_be_a_json_object(raw: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=f"^{reason}"):
        decode(None, raw=raw)


def test_record_missing() -> None:
    with pytest.raises(DecodeError, match="record is missing"):
        decode(None)


@pytest.mark.parametrize(
    ("sats", "lat", "lon", "valid"),
    [
        (0, 54.0, 25.0, False),
        (None, 0.0, 0.0, False),
        (5, 0, 0, False),
        (5, 0.0, 1.0, True),
        (None, 54.0, 25.0, True),
    ],
)
def test_valid_flag(sats: int | None, lat: float, lon: float, valid: bool) -> None:
    assert decode(base(satellites=sats, lat=lat, lon=lon)).valid is valid


def test_sentinels_anywhere_in_io() -> None:
    io = {
        "big": {"__bigint__": "-123456789012345678901234567890"},
        "u64": {"__bigint__": "18446744073709551615"},
        "raw": {"__bytes__": base64.b64encode(b"\x00\xffAB").decode()},
        "nested": [{"x": {"__bytes__": ""}}, [{"__bigint__": "7"}]],
    }
    attrs = json.loads(decode(base(io=io)).attributes)
    assert attrs == {
        "big": -123456789012345678901234567890,
        "u64": 18446744073709551615,
        "raw": "00ff4142",
        "nested": [{"x": ""}, [7]],
    }


def test_sentinel_as_top_level_value() -> None:
    p = decode(base(satellites={"__bigint__": "12"}, lat={"__bigint__": "-45"}))
    assert (p.satellites, p.latitude) == (12, -45.0)


def test_wide_plain_integer_kept_exactly() -> None:
    raw = b'{"ts": 1700000000123, "lat": 1, "lon": 2, "io": {"n": 123456789012345678901234567890}}'
    assert '"n":123456789012345678901234567890' in decode(None, raw=raw).attributes


def test_escaped_sentinel_key_is_still_a_sentinel() -> None:
    raw = b'{"ts": 1700000000123, "lat": 1, "lon": 2, "io": {"a": {"\\u005f_bigint__": "5"}}}'
    assert json.loads(decode(None, raw=raw).attributes) == {"a": 5}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"__bigint__": "12", "x": 1}, "exactly one key"),
        ({"__bigint__": "1.5"}, "not a decimal integer"),
        ({"__bigint__": "0x10"}, "not a decimal integer"),
        ({"__bigint__": 12}, "not a decimal integer"),
        ({"__bigint__": ""}, "not a decimal integer"),
        ({"__bytes__": "!!!"}, "not valid base64"),
        ({"__bytes__": "AQI"}, "not valid base64"),
        ({"__bytes__": 5}, "not a base64 string"),
        ({"__bytes__": "AQID", "__bigint__": "1"}, "exactly one key"),
    ],
)
def test_malformed_sentinels(value: Any, message: str) -> None:
    with pytest.raises(DecodeError, match=message) as info:
        decode(base(io={"16": [value]}))
    assert "record.io.16[0]" in str(info.value)


def test_a_bigint_too_long_to_convert_is_a_decode_error() -> None:
    """CPython refuses to convert more than 4,300 digits (a DoS guard): a poison record, not a crash."""
    huge = {"__bigint__": "9" * 5000}
    for record_ in (base(io={"odo": huge}), base(io={"odo": [huge]}), base(ts=huge), base(satellites=huge)):
        with pytest.raises(DecodeError, match="__bigint__ has 5000 digits, more than the 4300"):
            decode(record_)
    assert json.loads(decode(base(io={"odo": {"__bigint__": "9" * 4300}})).attributes) == {
        "odo": int("9" * 4300)
    }


def test_io_must_be_an_object() -> None:
    with pytest.raises(DecodeError, match=r"record.io must be an object"):
        decode(base(io=[1, 2]))
    for sentinel in ({"__bigint__": "5"}, {"__bytes__": "AQI="}):  # decodes to a scalar
        with pytest.raises(DecodeError, match=r"record.io must be an object, got a sentinel"):
            decode(base(io=sentinel))


def test_received_at_must_be_integer_ms() -> None:
    for bad in (b"soon", b"1.5", b" 12", b"1_000", b"-5", b"", b"1" * 16, "١٢".encode()):
        with pytest.raises(DecodeError, match="received_at"):
            decode(base(), received_at=bad)


def test_deep_nesting_is_a_decode_error() -> None:
    raw = b'{"ts": 1700000000123, "lat": 1, "lon": 2, "io": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
    with pytest.raises(DecodeError, match=r"^record(\.io)?: nested deeper than 255 levels"):
        decode(None, raw=raw)


def test_error_messages_are_one_line_and_name_the_value() -> None:
    with pytest.raises(DecodeError) as info:
        decode(base(lat="north\nmore"))
    assert "\n" not in str(info.value) and "north" in str(info.value) and "record.lat" in str(info.value)


# --- property tests -------------------------------------------------------------

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=8) | st.sampled_from(["__bigint__", "__bytes__"]), children, max_size=4
        )
    ),
    max_leaves=20,
)
record_keys = st.sampled_from(
    ["ts", "lat", "lon", "alt", "angle", "speed", "satellites", "priority", "event_io_id", "io"]
)


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(record_keys | st.text(max_size=5), json_values, max_size=12),
    st.binary(max_size=70) | st.sampled_from([b"dev-1", b"356307042441013"]),
)
def test_any_record_yields_a_position_or_a_decode_error(record: dict[str, Any], device: bytes) -> None:
    try:
        p = decode(record, device=device)
    except DecodeError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(p, Position)
    json.loads(p.attributes)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_yield_a_position_or_a_decode_error(raw: bytes) -> None:
    try:
        p = decode(None, raw=raw)
    except DecodeError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(p, Position)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=-(10**40), max_value=10**40),
    st.binary(max_size=64),
    st.floats(min_value=-90, max_value=90),
    st.floats(min_value=-180, max_value=180),
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2026, 11, 1), timezones=st.just(UTC)),
)
def test_sentinels_round_trip(big: int, blob: bytes, lat: float, lon: float, when: datetime) -> None:
    rec = {
        "ts": when.isoformat(),
        "lat": lat,
        "lon": lon,
        "io": {"b": {"__bigint__": str(big)}, "x": {"__bytes__": base64.b64encode(blob).decode()}},
    }
    p = decode(rec)
    attrs = json.loads(p.attributes)
    assert attrs == {"b": big, "x": blob.hex()}
    assert p.ts_us == int(when.timestamp()) * 1_000_000 + when.microsecond
    assert (p.latitude, p.longitude) == (lat, lon)


def test_unknown_keys_are_ignored_even_with_a_bad_sentinel() -> None:
    assert decode(base(future={"__bigint__": "nope"})).valid


def test_error_path_quotes_odd_keys() -> None:
    with pytest.raises(DecodeError) as info:
        decode(base(io={"a\nb": {"__bigint__": "x"}}))
    assert "\n" not in str(info.value) and 'record.io."a\\nb"' in str(info.value)


# --- the fast path agrees with a plain reference implementation ------------------------------------


def reference_attributes(io: Any) -> Any:
    """What contract §1 says `attributes` holds, written the obvious way (stdlib only)."""
    if isinstance(io, dict):
        if set(io) == {"__bigint__"}:
            return int(io["__bigint__"])
        if set(io) == {"__bytes__"}:
            return base64.b64decode(io["__bytes__"], validate=True).hex()
        return {k: reference_attributes(v) for k, v in io.items()}
    if isinstance(io, list):
        return [reference_attributes(v) for v in io]
    return io


io_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.integers(min_value=-(10**40), max_value=10**40).map(lambda n: {"__bigint__": str(n)})
    | st.binary(max_size=12).map(lambda b: {"__bytes__": base64.b64encode(b).decode()})
)
io_values = st.recursive(
    io_leaves,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=15,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=4), io_values, max_size=6))
def test_attributes_match_the_reference(io: dict[str, Any]) -> None:
    raw = json.dumps({"ts": 1_700_000_000_000, "lat": 1.5, "lon": 2.5, "io": io}).encode()
    p = decode(None, raw=raw)
    assert json.loads(p.attributes) == reference_attributes(json.loads(raw)["io"])


# --- the reader's flat field lists -------------------------------------------------------

FIELD_NAMES = st.sampled_from([b"device_id", b"record", b"received_at", b"codec", b"x"])


@given(st.lists(st.tuples(FIELD_NAMES, FIELD_NAMES | st.binary(max_size=4)), max_size=6))
def test_contract_fields_reads_a_flat_list_as_a_dict_would(pairs: list[tuple[bytes, bytes]]) -> None:
    """Any order, repeats (last wins) and values that look like names: the same as dict(pairs)."""
    flat = [item for pair in pairs for item in pair]
    fields = dict(pairs)
    assert contract_fields(flat) == (
        fields.get(b"device_id"),
        fields.get(b"record"),
        fields.get(b"received_at"),
    )


def test_contract_fields_gateway_layout() -> None:
    flat = [b"device_id", b"1", b"record", b"{}", b"codec", b"8E", b"received_at", b"2"]
    assert contract_fields(flat) == (b"1", b"{}", b"2")
    flat[5] = b"record"  # a codec value that reads like a name changes nothing
    assert contract_fields(flat) == (b"1", b"{}", b"2")
    flat[4] = b"record"  # but a repeated name does: the last one counts
    assert contract_fields(flat) == (b"1", b"record", b"2")


FIELD_VALUES = st.sampled_from(
    [
        b"356307042441013",
        json.dumps({"ts": 1_700_000_000_123, "lat": 1.5, "lon": 2.5}).encode(),
        json.dumps({"ts": 1_700_000_000_124, "lat": 91, "lon": 2.5}).encode(),
        b"1700000000999",
        b"8E",
    ]
)


def decode_one_page(entry_id: bytes, flat: list[bytes], *, now_us: int, max_future_us: int) -> Position:
    """The reader's path for one entry: a page of it through decode_page, its error raised."""
    out: list[Position] = []
    failures, vanished, _ = decode_page([(entry_id, flat)], out, now_us, max_future_us, sys.maxsize)
    assert vanished == []
    if failures:
        raise DecodeError(failures[0][2])
    return out[0]


@given(st.lists(st.tuples(FIELD_NAMES, FIELD_VALUES | st.binary(max_size=4)), max_size=6))
def test_decode_page_decodes_a_flat_list_as_decode_entry_does(pairs: list[tuple[bytes, bytes]]) -> None:
    """The reader's path: any layout, repeats and junk give the same position or the same error."""
    flat = [item for pair in pairs for item in pair]

    def outcome(decode_: Any, fields: Any) -> Any:
        try:
            return decode_(b"1-0", fields, now_us=NOW_US, max_future_us=DAY_US)
        except DecodeError as exc:
            return str(exc)

    assert outcome(decode_one_page, flat) == outcome(decode_entry, dict(pairs))


@pytest.mark.parametrize(
    "names",
    [
        [b"device_id", b"record", b"codec", b"received_at"],  # the gateway's layout
        [b"record", b"device_id", b"received_at", b"codec"],
        [b"device_id", b"record", b"received_at", b"x-trace"],
        [b"device_id", b"record", b"record", b"received_at"],  # a repeated name: the last counts
        [b"device_id", b"record"],
    ],
)
def test_the_flat_field_list_decodes_like_the_fields(names: list[bytes]) -> None:
    """decode_page (the reader's path) reads the list Redis sends; it agrees with decode_entry."""
    values = {
        b"device_id": b"356307042441013",
        b"record": json.dumps(base(io={"16": {"__bigint__": "7"}})).encode(),
        b"codec": b"8E",
        b"received_at": b"1700000000999",
        b"x-trace": b"abc",
    }
    flat = [part for name in names for part in (name, values[name])]
    if names.count(b"record") == 2:
        flat[5] = json.dumps(base(lat=1.5)).encode()
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    expected = decode_entry(b"1-0", fields, now_us=NOW_US, max_future_us=DAY_US)
    assert decode_one_page(b"1-0", flat, now_us=NOW_US, max_future_us=DAY_US) == expected


def test_a_position_begins_with_the_copied_columns_in_order() -> None:
    """The writer copies position[:COPIED] as a row: field order is the COPY's column order."""
    from tpx.records import COPIED, COPY_COLUMNS, Position

    names = [name for name, _, _ in COPY_COLUMNS]
    fields = [f.removesuffix("_pg").removesuffix("_jsonb") for f in Position._fields[:COPIED]]
    assert fields == names
    assert Position._fields[COPIED:] == ("ts_us", "entry_id")


def test_a_position_carries_postgres_binary_forms() -> None:
    p = decode(base(io={"a": 1}), received_at=b"1700000000999")
    assert p.ts_pg == p.ts_us - 946_684_800_000_000 == 1_700_000_000_123_000 - 946_684_800_000_000
    assert p.attributes_jsonb == b'\x01{"a":1}' and p.attributes == '{"a":1}'
    assert p.received_at_pg == 1_700_000_000_999_000 - 946_684_800_000_000
    assert decode(base()).attributes_jsonb == b"\x01{}"


@pytest.mark.parametrize(
    ("key", "value", "stored"),
    [
        ("alt", 3.4e38, 3.4e38),
        ("alt", -3.4e38, -3.4e38),
        ("alt", 1e-40, 1e-40),  # a subnormal real: PostgreSQL keeps it too
        ("speed", 0.0, 0.0),
        ("angle", 0.0, 0.0),
        ("alt", -0.0, -0.0),
    ],
)
def test_real_columns_take_what_a_real_holds(key: str, value: float, stored: float) -> None:
    assert getattr(decode(base(**{key: value})), {"alt": "altitude"}.get(key, key)) == stored


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("alt", 1e39, "record.alt out of range for a real"),
        ("alt", -1e39, "record.alt out of range for a real"),
        ("speed", 3.5e38, "record.speed out of range for a real"),
        ("alt", 1e-50, "record.alt out of range for a real (too close to 0)"),
        ("speed", 1e-46, "record.speed out of range for a real (too close to 0)"),
        ("angle", 1e-50, "record.angle out of range for a real (too close to 0)"),
    ],
)
def test_real_columns_refuse_what_postgres_would(key: str, value: float, message: str) -> None:
    """altitude, angle and speed are copied as 4-byte reals: what PostgreSQL's cast from a double
    would refuse (overflow, or a non-zero value that becomes 0) is a decode error, not a silent inf or 0."""
    with pytest.raises(DecodeError, match=re.escape(message)):
        decode(base(**{key: value}))


# --- one nesting limit, whatever path a record takes (issue 13, item 13) -------------------------

WIDE = 2**70  # wider than 64 bits: orjson cannot hold it, so the record goes through the stdlib parse


def nested_record(depth: int, wide: bool, key: str = "io") -> bytes:
    """A valid record whose JSON nests ``depth`` levels (the record object is level 1), the deepest
    part under ``key``; ``wide`` adds an integer wider than 64 bits to ``io``."""
    io = f'{{"w": {WIDE}}}' if wide else "{}"
    if key == "io":  # io (level 2) holds the deep list: depth - 2 more levels
        inner = "[" * (depth - 2) + "]" * (depth - 2)
        io = f'{{"w": {WIDE}, "d": {inner}}}' if wide else f'{{"d": {inner}}}'
        return f'{{"ts": 1700000000123, "lat": 1, "lon": 2, "io": {io}}}'.encode()
    inner = "[" * (depth - 1) + "]" * (depth - 1)
    return f'{{"ts": 1700000000123, "lat": 1, "lon": 2, "io": {io}, "{key}": {inner}}}'.encode()


def verdict(raw: bytes) -> str:
    try:
        decode(None, raw=raw)
    except DecodeError as exc:
        return str(exc)
    return "stored"


def test_the_nesting_limit_is_documented_and_named() -> None:
    from tpx.records import MAX_NESTING

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert f"{MAX_NESTING} levels" in readme and "MAX_NESTING" in readme


@pytest.mark.parametrize("key", ["io", "x-unknown"])
@pytest.mark.parametrize("offset", [0, 1, 100_000])
def test_nesting_gets_one_verdict_with_or_without_a_wide_integer(key: str, offset: int) -> None:
    """At the limit a record is stored, one level deeper (or 100,000 deeper) it is poison, with the
    same one-line message whether or not an unrelated wide integer sends it through the stdlib."""
    from tpx.records import MAX_NESTING

    depth = MAX_NESTING + offset
    plain, wide = verdict(nested_record(depth, False, key)), verdict(nested_record(depth, True, key))
    assert plain == wide
    if offset == 0:
        assert plain == "stored"
    else:
        assert plain == f"record{'.' + key if offset == 1 else ''}: nested deeper than {MAX_NESTING} levels"


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=-4, max_value=4), st.sampled_from(["io", "x"]))
def test_nesting_around_the_limit_never_depends_on_a_wide_integer(offset: int, key: str) -> None:
    from tpx.records import MAX_NESTING

    depth = MAX_NESTING + offset
    assert verdict(nested_record(depth, False, key)) == verdict(nested_record(depth, True, key))
    assert (verdict(nested_record(depth, False, key)) == "stored") is (offset <= 0)


def test_a_sentinel_nested_deeply_gets_the_nesting_verdict() -> None:
    """A sentinel at the bottom of a deep value: the walk that replaces it is bounded too."""
    from tpx.records import MAX_NESTING

    for depth in (MAX_NESTING + 1, 5000):
        ts = '{"a": ' * (depth - 1) + '{"__bigint__": "1"}' + "}" * (depth - 1)
        raw = f'{{"ts": {ts}, "lat": 1, "lon": 2}}'.encode()
        assert verdict(raw).endswith(f"nested deeper than {MAX_NESTING} levels")


def test_a_decoder_bug_sets_the_record_aside_instead_of_killing_the_reader(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception the decoder does not foresee (as a ``__bigint__`` too long for ``int()``
    once raised ValueError) becomes that record's dead-letter reason: raised out of
    decode_page it killed the reader, and again at every restart on the same pending entry."""
    real = records._decode

    def buggy(entry_id: bytes, *args: Any, **kwargs: Any) -> Position:
        if entry_id == b"2-0":
            raise ValueError("exceeds the limit (4300 digits) for integer string conversion")
        return real(entry_id, *args, **kwargs)

    monkeypatch.setattr(records, "_decode", buggy)
    flat = [b"device_id", b"356307042441013", b"record", json.dumps(base()).encode()]
    out: list[Position] = []
    with caplog.at_level("ERROR"):
        failures, _, _ = decode_page(
            [(b"1-0", flat), (b"2-0", flat), (b"3-0", flat)], out, NOW_US, DAY_US, sys.maxsize
        )
    assert [p.entry_id for p in out] == [b"1-0", b"3-0"]
    assert [(entry_id, reason.split(":")[0]) for entry_id, _, reason in failures] == [
        (b"2-0", "the decoder failed (ValueError")
    ]
    assert "a tpx bug" in failures[0][2] and "decoder bug on entry 2-0" in caplog.text
    with pytest.raises(DecodeError, match=r"the decoder failed \(ValueError"):  # tpx claim's path
        records.decode_values(b"2-0", b"356307042441013", flat[3], None, now_us=NOW_US, max_future_us=DAY_US)
