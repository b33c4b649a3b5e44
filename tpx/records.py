"""Core types and the record decoder (CONTRACT.md §1).

A stream entry (its fields, as Redis returns them: bytes) becomes either a
:class:`Position`, ready to be written, or a :class:`DecodeError` whose message
names the offending field and value. Everything here is pure: no I/O, no clock
reads (the caller passes ``now_us``), so it is cheap to property-test and cheap
on the hot path.

Speed notes (``benchmarks/bench_decode.py`` measures them):

* the record JSON is parsed with orjson; a record that carries an integer of
  20 or more digits is parsed by the stdlib instead, because orjson turns
  integers wider than 64 bits into floats and we must store them exactly;
* the sentinel walk only runs when the raw bytes could hold a sentinel key
  (``__`` or a ``\\u`` escape somewhere in them);
* ``attributes`` is serialised once, here, to the JSON text that the writer
  copies into a ``text`` staging column; Postgres casts it to jsonb.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import orjson

# --- the contract's limits -------------------------------------------------

#: 2000-01-01T00:00:00Z in epoch microseconds: no fix can be older.
MIN_TS_US: Final = 946_684_800_000_000
#: ``event_io_id`` is stored in an ``integer`` column.
INT32_MIN: Final = -(2**31)
INT32_MAX: Final = 2**31 - 1

DEVICE_ID_RE: Final = re.compile(rb"[A-Za-z0-9._:\-]{1,64}")

_WIDE_INT_RE: Final = re.compile(rb"\d{20,}")
_EPOCH_MS_RE: Final = re.compile(rb"[0-9]{1,15}")
_BIGINT: Final = "__bigint__"
_BYTES: Final = "__bytes__"
_BIGINT_RE: Final = re.compile(r"-?[0-9]+")

KNOWN_KEYS: Final = frozenset(
    ("ts", "lat", "lon", "alt", "angle", "speed", "satellites", "priority", "event_io_id", "io")
)

F_DEVICE_ID: Final = b"device_id"
F_RECORD: Final = b"record"
F_RECEIVED_AT: Final = b"received_at"


class DecodeError(ValueError):
    """A record that is not valid by the contract (a poison record).

    The message is one line and names the field or value at fault: it becomes
    the dead letter's ``dlq_error``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


@dataclass(slots=True)
class Position:
    """One decoded position record, in the shape the writer copies.

    Times are integer epoch microseconds (exact, cheap to copy and compare);
    ``attributes`` is JSON text, already serialised.
    """

    entry_id: bytes
    device_id: str
    ts_us: int
    latitude: float
    longitude: float
    altitude: float | None
    angle: float | None
    speed: float | None
    satellites: int | None
    priority: int | None
    event_io_id: int | None
    valid: bool
    attributes: str
    received_at_us: int | None

    def copy_row(self) -> tuple[Any, ...]:
        """The row for the staging table, in :data:`STAGE_COLUMNS` order."""
        return (
            self.device_id,
            self.ts_us,
            self.latitude,
            self.longitude,
            self.altitude,
            self.angle,
            self.speed,
            self.satellites,
            self.priority,
            self.event_io_id,
            self.valid,
            self.attributes,
            self.received_at_us,
        )


#: Staging-table columns and their COPY types, in :meth:`Position.copy_row` order.
STAGE_COLUMNS: Final = (
    ("device_id", "text"),
    ("ts_us", "int8"),
    ("latitude", "float8"),
    ("longitude", "float8"),
    ("altitude", "float8"),
    ("angle", "float8"),
    ("speed", "float8"),
    ("satellites", "int2"),
    ("priority", "int2"),
    ("event_io_id", "int4"),
    ("valid", "bool"),
    ("attributes", "text"),
    ("received_at_us", "int8"),
)


# --- helpers ----------------------------------------------------------------


def _show(value: Any, limit: int = 60) -> str:
    """A short, one-line rendering of a value for an error message."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    try:
        text = json.dumps(value, ensure_ascii=True, default=repr)
    except ValueError:  # circular or otherwise odd: repr is enough
        text = repr(value)
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


_PLAIN_KEY_RE: Final = re.compile(r"[A-Za-z0-9_\-]{1,40}")


def _key(key: str) -> str:
    """A key as it appears in an error path: plain, or JSON-quoted and short."""
    return key if _PLAIN_KEY_RE.fullmatch(key) else _show(key, limit=24)


def _unsentinel(value: Any, path: str) -> Any:
    """Replace sentinel objects anywhere inside ``value`` by what they stand for."""
    if isinstance(value, dict):
        if _BIGINT in value or _BYTES in value:
            if len(value) != 1:
                raise DecodeError(f"{path}: a sentinel object must have exactly one key, got {_show(value)}")
            if _BIGINT in value:
                digits = value[_BIGINT]
                if not isinstance(digits, str) or not _BIGINT_RE.fullmatch(digits):
                    raise DecodeError(f"{path}: __bigint__ is not a decimal integer: {_show(digits)}")
                return int(digits)
            encoded = value[_BYTES]
            if not isinstance(encoded, str):
                raise DecodeError(f"{path}: __bytes__ is not a base64 string: {_show(encoded)}")
            try:
                return base64.b64decode(encoded.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError):
                raise DecodeError(f"{path}: __bytes__ is not valid base64: {_show(encoded)}") from None
        return {k: _unsentinel(v, f"{path}.{_key(k)}") for k, v in value.items()}
    if isinstance(value, list):
        return [_unsentinel(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _bytes_to_hex(value: Any) -> Any:
    """``attributes`` stores byte strings as lowercase hex (contract §1)."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _bytes_to_hex(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_bytes_to_hex(v) for v in value]
    return value


def _reject_constant(name: str) -> Any:
    raise DecodeError(f"record: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise DecodeError(f"record: number out of range: {_show(text)}")
    return value


def _parse_json(raw: bytes) -> Any:
    if _WIDE_INT_RE.search(raw) is None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"record: not valid JSON ({exc})") from None
    try:
        return json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(f"record: not valid JSON ({str(exc).splitlines()[0]})") from None


def _is_number(value: Any) -> bool:
    t = type(value)
    if t is float:
        return math.isfinite(value)
    return t is int


def _number(rec: dict[str, Any], key: str, required: bool) -> float | None:
    value = rec.get(key)
    if value is None:
        if required:
            raise DecodeError(f"record.{key} is missing" if key not in rec else f"record.{key} is null")
        return None
    if not _is_number(value):
        raise DecodeError(f"record.{key} must be a number, got {_show(value)}")
    try:
        return float(value)
    except OverflowError:  # a __bigint__ wider than a double
        raise DecodeError(f"record.{key} out of range: {_show(value)}") from None


def _integer(rec: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = rec.get(key)
    if value is None:
        return None
    if type(value) is not int:
        raise DecodeError(f"record.{key} must be an integer, got {_show(value)}")
    if not lo <= value <= hi:
        raise DecodeError(f"record.{key} out of range {lo}..{hi}: {_show(value)}")
    return value


def _timestamp_us(value: Any, now_us: int, max_future_us: int) -> int:
    if type(value) is int:
        ts_us = value * 1000
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise DecodeError(f"record.ts is not an ISO-8601 time: {_show(value)}") from None
        if parsed.utcoffset() is None:
            raise DecodeError(f"record.ts has no UTC offset: {_show(value)}")
        delta = parsed - datetime.fromisoformat("1970-01-01T00:00:00+00:00")
        ts_us = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    elif value is None:
        raise DecodeError("record.ts is null")
    else:
        raise DecodeError(f"record.ts must be epoch milliseconds or an ISO-8601 string, got {_show(value)}")
    if ts_us < MIN_TS_US:
        raise DecodeError(f"record.ts is before 2000-01-01: {_show(value)}")
    if ts_us > now_us + max_future_us:
        raise DecodeError(f"record.ts is too far in the future: {_show(value)}")
    return ts_us


def _attributes(io: Any, had_sentinels: bool) -> str:
    if io is None:
        return "{}"
    if not isinstance(io, dict):
        raise DecodeError(f"record.io must be an object, got {_show(io)}")
    if had_sentinels:
        io = _bytes_to_hex(io)
    try:
        return orjson.dumps(io).decode()
    except orjson.JSONEncodeError as exc:
        if "Integer exceeds 64-bit range" not in str(exc):
            raise DecodeError(f"record.io cannot be stored: {exc}") from None
    try:  # integers wider than 64 bits: the stdlib writes them exactly
        text = json.dumps(io, ensure_ascii=False, separators=(",", ":"))
        text.encode("utf-8")
    except (ValueError, UnicodeEncodeError) as exc:
        raise DecodeError(f"record.io cannot be stored: {exc}") from None
    return text


# --- the decoder ------------------------------------------------------------


def decode_entry(
    entry_id: bytes,
    fields: dict[bytes, bytes],
    *,
    now_us: int,
    max_future_us: int,
) -> Position:
    """Decode one stream entry into a :class:`Position`, or raise :class:`DecodeError`."""
    try:
        return _decode(entry_id, fields, now_us, max_future_us)
    except RecursionError:
        raise DecodeError("record: nested too deeply") from None


def _decode(entry_id: bytes, fields: dict[bytes, bytes], now_us: int, max_future_us: int) -> Position:
    device = fields.get(F_DEVICE_ID)
    if device is None:
        raise DecodeError("device_id is missing")
    if DEVICE_ID_RE.fullmatch(device) is None:
        raise DecodeError(f"device_id is invalid (1-64 of A-Z a-z 0-9 . _ : -): {_show(device)}")
    raw = fields.get(F_RECORD)
    if raw is None:
        raise DecodeError("record is missing")
    rec = _parse_json(raw)
    if not isinstance(rec, dict):
        raise DecodeError(f"record must be a JSON object, got {_show(rec)}")

    had_sentinels = b"__" in raw or b"\\u" in raw
    if had_sentinels:  # known keys only: unknown keys are ignored, whatever they hold
        rec = {k: _unsentinel(v, f"record.{k}") for k, v in rec.items() if k in KNOWN_KEYS}

    if "ts" not in rec:
        raise DecodeError("record.ts is missing")
    ts_us = _timestamp_us(rec["ts"], now_us, max_future_us)
    lat = _number(rec, "lat", required=True)
    lon = _number(rec, "lon", required=True)
    assert lat is not None and lon is not None  # noqa: S101  (required=True never returns None)
    if not -90.0 <= lat <= 90.0:
        raise DecodeError(f"record.lat out of range -90..90: {_show(rec['lat'])}")
    if not -180.0 <= lon <= 180.0:
        raise DecodeError(f"record.lon out of range -180..180: {_show(rec['lon'])}")
    alt = _number(rec, "alt", required=False)
    angle = _number(rec, "angle", required=False)
    if angle is not None and not 0.0 <= angle <= 360.0:
        raise DecodeError(f"record.angle out of range 0..360: {_show(rec['angle'])}")
    speed = _number(rec, "speed", required=False)
    if speed is not None and speed < 0.0:
        raise DecodeError(f"record.speed must be >= 0: {_show(rec['speed'])}")
    satellites = _integer(rec, "satellites", 0, 255)
    priority = _integer(rec, "priority", 0, 2)
    event_io_id = _integer(rec, "event_io_id", INT32_MIN, INT32_MAX)
    attributes = _attributes(rec.get("io"), had_sentinels)

    received_at_us = None
    received = fields.get(F_RECEIVED_AT)
    if received is not None:
        if _EPOCH_MS_RE.fullmatch(received) is None:
            raise DecodeError(f"received_at must be integer epoch milliseconds: {_show(received)}")
        received_at_us = int(received) * 1000

    valid = satellites != 0 and not (lat == 0.0 and lon == 0.0)
    return Position(
        entry_id=entry_id,
        device_id=device.decode("ascii"),
        ts_us=ts_us,
        latitude=lat,
        longitude=lon,
        altitude=alt,
        angle=angle,
        speed=speed,
        satellites=satellites,
        priority=priority,
        event_io_id=event_io_id,
        valid=valid,
        attributes=attributes,
        received_at_us=received_at_us,
    )
