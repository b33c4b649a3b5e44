"""Core types and the record decoder (CONTRACT.md §1).

A stream entry (its fields, as Redis returns them: bytes) becomes either a
:class:`Position`, ready to be written, or a :class:`DecodeError` whose message
names the offending field and value. Everything here is pure: no I/O, no clock
reads (the caller passes ``now_us``), so it is cheap to property-test and cheap
on the hot path.

Speed notes (``benchmarks/bench_decode.py`` measures them):

* the record JSON is parsed with orjson. orjson turns integers wider than
  64 bits into floats; when the walk over ``io`` meets a float that may be
  such an integer, the record is parsed again by the stdlib, which keeps
  them exact (they are rare: the gateway wraps 64-bit values in sentinels);
* one walk over ``io`` replaces sentinels in place (bytes straight to hex);
  unknown top-level keys are never walked: they are ignored, whatever they hold;
* ``attributes`` is serialised once, here, to the JSON text that the writer
  copies into a ``text`` staging column; Postgres casts it to jsonb.
"""

from __future__ import annotations

import binascii
import json
import logging
import math
import re
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final, NamedTuple

import orjson

from tpx.errors import first_line

log = logging.getLogger(__name__)

# --- the contract's limits -------------------------------------------------

#: 2000-01-01T00:00:00Z in epoch microseconds: PostgreSQL's epoch. A ``timestamptz`` in binary
#: form is the microseconds since then, so the decoder hands the writer ``ts_us - PG_EPOCH_US``.
PG_EPOCH_US: Final = 946_684_800_000_000
#: No fix can be older than 2000-01-01T00:00:00Z (the contract), which is PostgreSQL's epoch too:
#: a stored ``ts`` in binary form is never negative.
MIN_TS_US: Final = PG_EPOCH_US
#: ``event_io_id`` is stored in an ``integer`` column.
INT32_MIN: Final = -(2**31)
INT32_MAX: Final = 2**31 - 1

DEVICE_ID_RE: Final = re.compile(rb"[A-Za-z0-9._:\-]{1,64}")

#: The deepest a record may nest, in levels of arrays and objects (the record object is level 1).
#: orjson's serialiser stops at 254 levels, i.e. an ``io`` at the record's 255th: one limit, checked
#: on the parsed record whatever path it takes next (orjson, the stdlib, the sentinel walk).
MAX_NESTING: Final = 255
#: A record shorter than this cannot nest deeper than MAX_NESTING (each level takes two brackets).
_NESTING_MIN_BYTES: Final = 2 * (MAX_NESTING + 1)

_BIGINT: Final = "__bigint__"
_BYTES: Final = "__bytes__"

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


#: A ``jsonb`` value in binary form: a version byte, then the JSON text.
JSONB_VERSION: Final = b"\x01"


class Position(NamedTuple):
    """One decoded position record, in the shape the writer copies.

    The first 13 fields are the ``positions`` columns in binary COPY form, in the order of
    ``COPY_COLUMNS``: the writer copies ``position[:COPIED]`` as it is. Times are integer
    microseconds (exact, cheap to copy and compare): ``ts_pg`` and ``received_at_pg`` count
    from PostgreSQL's epoch (2000-01-01), ``ts_us`` from the Unix epoch. ``attributes_jsonb``
    is the serialised ``io`` with jsonb's version byte in front; ``attributes`` is its JSON text.
    """

    device_id: str
    ts_pg: int
    latitude: float
    longitude: float
    altitude: float | None
    angle: float | None
    speed: float | None
    satellites: int | None
    priority: int | None
    event_io_id: int | None
    valid: bool
    attributes_jsonb: bytes
    received_at_pg: int | None
    ts_us: int
    entry_id: bytes

    @property
    def attributes(self) -> str:
        """The decoded ``io`` as JSON text (what ``positions.attributes`` holds)."""
        return self.attributes_jsonb[1:].decode()

    @property
    def received_at_us(self) -> int | None:
        """``received_at`` in epoch microseconds, or None."""
        return None if self.received_at_pg is None else self.received_at_pg + PG_EPOCH_US


#: ``tuple.__new__`` builds a Position without the Python-level ``__new__`` frame NamedTuple adds:
#: -1.6k of the decoder's ~60k instructions per record (callgrind).
_new_position: Callable[[type[Position], tuple[Any, ...]], Position] = tuple.__new__


#: The ``positions`` columns a Position fills, in its field order, with the type each is
#: sent as in binary COPY (a value's bytes must be the column type's binary form: ``int8``
#: microseconds for ``timestamptz``, ``bytea`` for jsonb's version byte + text) and the
#: column's own type (the staging table's).
COPY_COLUMNS: Final = (
    ("device_id", "text", "text"),
    ("ts", "int8", "timestamptz"),
    ("latitude", "float8", "double precision"),
    ("longitude", "float8", "double precision"),
    ("altitude", "float4", "real"),
    ("angle", "float4", "real"),
    ("speed", "float4", "real"),
    ("satellites", "int2", "smallint"),
    ("priority", "int2", "smallint"),
    ("event_io_id", "int4", "integer"),
    ("valid", "bool", "boolean"),
    ("attributes", "bytea", "jsonb"),
    ("received_at", "int8", "timestamptz"),
)
#: How many leading fields of a Position are copied (all but ``ts_us`` and ``entry_id``).
COPIED: Final = len(COPY_COLUMNS)


# --- helpers ----------------------------------------------------------------


def _show(value: Any, limit: int = 60) -> str:
    """A short, one-line rendering of a value for an error message."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    try:
        text = json.dumps(value, ensure_ascii=True, default=repr)
    except ValueError:  # circular or otherwise odd: repr is enough
        text = repr(value)
    except RecursionError:  # never deeper than MAX_NESTING from the decoder; a caller's own value
        text = f"<a nested {type(value).__name__}>"
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


_PLAIN_KEY_RE: Final = re.compile(r"[A-Za-z0-9_\-]{1,40}")
#: The longest digit string int() converts (CPython's guard against quadratic conversion).
_INT_DIGITS: Final = sys.get_int_max_str_digits() or sys.maxsize
#: Value types the walk looks into (with floats: when orjson may have turned a wide integer into one).
_WALKED: Final = frozenset((dict, list))
_WALKED_WIDE: Final = frozenset((dict, list, float))
#: orjson parses integers in [-2**63, 2**64) exactly and wider ones as floats.
_WIDE: Final = float(2**63)


def _key(key: str) -> str:
    """A key as it appears in an error path: plain, or JSON-quoted and short."""
    return key if _PLAIN_KEY_RE.fullmatch(key) else _show(key, limit=24)


def _too_deep(where: str) -> DecodeError:
    return DecodeError(f"{where}: nested deeper than {MAX_NESTING} levels")


def _check_nesting(rec: Any) -> None:
    """Raise the nesting error when ``rec`` nests deeper than MAX_NESTING (no recursion: any depth)."""
    tops = rec.items() if type(rec) is dict else [("", rec)]
    for key, top in tops:
        stack = [(top, 2 if key else 1)]
        while stack:
            value, depth = stack.pop()
            t = type(value)
            if t is not dict and t is not list:
                continue
            if depth > MAX_NESTING:
                raise _too_deep(f"record.{_key(key)}" if key else "record")
            stack.extend((v, depth + 1) for v in (value.values() if t is dict else value))


class _WideIntegerError(Exception):
    """orjson turned an integer wider than 64 bits into a float: parse again with the stdlib."""


class _SentinelError(Exception):
    """A malformed sentinel; ``path`` is filled in (innermost first) on the way up."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str] = []

    def at(self, prefix: str) -> DecodeError:
        return DecodeError(f"{prefix}{''.join(reversed(self.path))}: {self.reason}")


def _sentinel(value: dict[str, Any], hexify: bool) -> int | bytes | str:
    if len(value) != 1:
        raise _SentinelError(f"a sentinel object must have exactly one key, got {_show(value)}")
    if _BIGINT in value:
        digits = value[_BIGINT]
        if type(digits) is str:
            unsigned = digits[1:] if digits[:1] == "-" else digits
            # isdigit() on an ASCII string means 0-9 only (int() would also take "1_0", " 1", "+1")
            if unsigned.isdigit() and unsigned.isascii():
                try:
                    return int(digits)
                except ValueError:  # longer than sys.get_int_max_str_digits(): CPython's guard
                    raise _SentinelError(
                        f"__bigint__ has {len(unsigned)} digits, more than the"
                        f" {sys.get_int_max_str_digits()} tpx converts"
                    ) from None
        raise _SentinelError(f"__bigint__ is not a decimal integer: {_show(digits)}")
    encoded = value[_BYTES]
    if type(encoded) is not str:
        raise _SentinelError(f"__bytes__ is not a base64 string: {_show(encoded)}")
    try:
        data = binascii.a2b_base64(encoded, strict_mode=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise _SentinelError(f"__bytes__ is not valid base64: {_show(encoded)}") from None
    return data.hex() if hexify else data


def _walk(value: Any, hexify: bool, check_wide: bool) -> Any:  # noqa: PLR0912  (hot path, inlined)
    """Replace sentinels inside ``value`` (in place where it can) and return the result.

    ``hexify`` turns byte strings into lowercase hex (how ``attributes`` stores them);
    ``check_wide`` raises :class:`_WideIntegerError` at a float that may be a wide integer.
    """
    t = type(value)
    if t is dict:
        if _BIGINT in value or _BYTES in value:
            return _sentinel(value, hexify)
        for k, v in value.items():
            tv = type(v)
            if tv is dict or tv is list or (check_wide and tv is float):
                try:
                    if tv is dict and (_BIGINT in v or _BYTES in v):  # the common nesting, one call less
                        new = _sentinel(v, hexify)
                    else:
                        new = _walk(v, hexify, check_wide)
                except _SentinelError as exc:
                    exc.path.append(f".{_key(k)}")
                    raise
                if new is not v:
                    value[k] = new  # replacing a value while iterating is allowed
        return value
    if t is list:
        for i, v in enumerate(value):
            tv = type(v)
            if tv is dict or tv is list or (check_wide and tv is float):
                try:
                    new = _walk(v, hexify, check_wide)
                except _SentinelError as exc:
                    exc.path.append(f"[{i}]")
                    raise
                if new is not v:
                    value[i] = new
        return value
    if t is float and check_wide and abs(value) >= _WIDE and value.is_integer():
        raise _WideIntegerError
    return value


#: How orjson's parser words its own depth limit (1024 levels), e.g. "depth limit exceeded: line 1 ...".
_ORJSON_TOO_DEEP: Final = ("depth limit exceeded", "Recursion limit reached")


def _reject_constant(name: str) -> Any:
    raise DecodeError(f"record: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise DecodeError(f"record: number out of range: {_show(text)}")
    return value


def _parse_stdlib(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except DecodeError:
        raise
    except RecursionError:  # never past the nesting check (run on orjson's parse first); a guard
        raise _too_deep("record") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise DecodeError(f"record: not valid JSON ({first_line(exc)})") from None


def _scalar(rec: dict[str, Any], key: str) -> Any:
    """A top-level value, with a sentinel decoded (bytes stay bytes: never a valid scalar)."""
    value = rec.get(key)
    if type(value) is dict:
        try:
            return _walk(value, hexify=False, check_wide=False)
        except _SentinelError as exc:
            raise exc.at(f"record.{key}") from None
    return value


def _bad_number(key: str, value: Any, required: bool) -> float | None:
    """The slow path of a number check: None, a sentinel, or an error."""
    if value is None:
        if required:
            raise DecodeError(f"record.{key} is null")
        return None
    t = type(value)
    if t is int:
        try:
            return float(value)
        except OverflowError:  # a __bigint__ wider than a double
            raise DecodeError(f"record.{key} out of range: {_show(value)}") from None
    if t is float and math.isfinite(value):
        return float(value)
    raise DecodeError(f"record.{key} must be a number, got {_show(value)}")


def _number(rec: dict[str, Any], key: str, required: bool) -> float | None:
    value = _scalar(rec, key)
    if type(value) is float:
        return value
    if value is None and required and key not in rec:
        raise DecodeError(f"record.{key} is missing")
    return _bad_number(key, value, required)


def _required_number(rec: dict[str, Any], key: str) -> float:
    value = _number(rec, key, required=True)
    assert value is not None  # noqa: S101  (required=True never returns None)
    return value


#: ``real`` (4-byte float) limits: the largest finite value and the smallest normal one.
#: Binary COPY sends ``altitude``, ``angle`` and ``speed`` as reals, so the decoder refuses what
#: PostgreSQL's float8 -> real cast would (overflow, or a non-zero value that becomes 0).
REAL_MAX: Final = 3.4028234663852886e38
REAL_TINY: Final = 1.1754943508222875e-38
_REAL: Final = struct.Struct("<f")


def _real(key: str, value: float) -> float:
    """The slow path of the real check (magnitudes outside REAL_TINY..REAL_MAX), exact."""
    try:
        (stored,) = _REAL.unpack(_REAL.pack(value))
    except OverflowError:
        raise DecodeError(f"record.{key} out of range for a real: {_show(value)}") from None
    if stored == 0.0 and value != 0.0:
        raise DecodeError(f"record.{key} out of range for a real (too close to 0): {_show(value)}")
    return value


def _integer(rec: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = _scalar(rec, key)
    if value is None:
        return None
    if type(value) is not int:
        raise DecodeError(f"record.{key} must be an integer, got {_show(value)}")
    if not lo <= value <= hi:
        raise DecodeError(f"record.{key} out of range {lo}..{hi}: {_show(value)}")
    return value


_EPOCH: Final = datetime.fromisoformat("1970-01-01T00:00:00+00:00")


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
        delta = parsed - _EPOCH
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


_EMPTY_JSONB: Final = JSONB_VERSION + b"{}"


def _walk_io(io: dict[str, Any], check_wide: bool) -> None:
    """:func:`_walk` for ``io`` itself: most of its values are small integers, passed over with
    one set lookup each, and the usual sentinels are replaced inline (anything else, including
    every malformed sentinel, takes the general path and its precise error)."""
    walked = _WALKED_WIDE if check_wide else _WALKED
    for k, v in io.items():
        if type(v) not in walked:
            continue
        if type(v) is dict and len(v) == 1:
            arg = v.get(_BIGINT)
            if arg is not None:
                if type(arg) is str and arg.isdigit() and arg.isascii() and len(arg) <= _INT_DIGITS:
                    io[k] = int(arg)  # replacing a value while iterating is allowed
                    continue
            else:
                arg = v.get(_BYTES)
                if type(arg) is str:
                    try:
                        io[k] = binascii.a2b_base64(arg, strict_mode=True).hex()
                        continue
                    except (binascii.Error, ValueError):
                        pass
        try:
            new = _walk(v, hexify=True, check_wide=check_wide)
        except _SentinelError as exc:
            exc.path.append(f".{_key(k)}")
            raise
        if new is not v:
            io[k] = new


def _attributes(io: Any, check_wide: bool) -> bytes:
    """``io`` with its sentinels replaced, serialised in jsonb's binary form."""
    if io is None:
        return _EMPTY_JSONB
    if type(io) is not dict:
        raise DecodeError(f"record.io must be an object, got {_show(io)}")
    if _BIGINT in io or _BYTES in io:  # io is itself a sentinel: an integer or bytes, not an object
        try:
            scalar = _walk(io, hexify=True, check_wide=check_wide)
        except _SentinelError as exc:
            raise exc.at("record.io") from None
        raise DecodeError(f"record.io must be an object, got a sentinel for {_show(scalar)}")
    try:
        _walk_io(io, check_wide)
    except _SentinelError as exc:
        raise exc.at("record.io") from None
    try:
        return JSONB_VERSION + orjson.dumps(io)
    except orjson.JSONEncodeError as exc:
        if "Integer exceeds 64-bit range" not in str(exc):
            raise DecodeError(f"record.io cannot be stored: {exc}") from None
    try:  # integers wider than 64 bits: the stdlib writes them exactly
        return JSONB_VERSION + json.dumps(io, ensure_ascii=False, separators=(",", ":")).encode()
    except (ValueError, UnicodeEncodeError) as exc:
        raise DecodeError(f"record.io cannot be stored: {exc}") from None


# --- the decoder ------------------------------------------------------------


def decode_entry(
    entry_id: bytes,
    fields: Mapping[bytes, bytes],
    *,
    now_us: int,
    max_future_us: int,
    max_record_bytes: int | None = None,
) -> Position:
    """Decode one stream entry into a :class:`Position`, or raise :class:`DecodeError`.

    ``max_record_bytes``: a longer ``record`` field is a decode error (None: no limit)."""
    return decode_values(
        entry_id,
        fields.get(F_DEVICE_ID),
        fields.get(F_RECORD),
        fields.get(F_RECEIVED_AT),
        now_us=now_us,
        max_future_us=max_future_us,
        max_record_bytes=max_record_bytes,
    )


def contract_fields(flat: Sequence[bytes]) -> tuple[bytes | None, bytes | None, bytes | None]:
    """``device_id``, ``record`` and ``received_at`` out of an entry's flat field list.

    The list is what Redis sends (name, value, name, value, ...); reading it in place
    spares the reader a dict per entry. A repeated name counts with its last value,
    as it would in a dict. (The gateway's own layout never gets here: :func:`decode_page`
    recognises it first.)
    """
    device = record = received = None
    for i in range(0, len(flat) - 1, 2):
        name = flat[i]
        if name == F_DEVICE_ID:
            device = flat[i + 1]
        elif name == F_RECORD:
            record = flat[i + 1]
        elif name == F_RECEIVED_AT:
            received = flat[i + 1]
    return device, record, received


#: The field names of an entry as the gateway writes them, in its order (values in between).
_GATEWAY_NAMES: Final = [F_DEVICE_ID, F_RECORD, b"codec", F_RECEIVED_AT]


#: Records up to this many bytes are not measured one by one: :func:`decode_page` reports the
#: largest record of a page only above it (below: 0). The common record (~300 B) pays one length
#: comparison; memory budgets count a record as at least this many bytes.
SMALL_RECORD_BYTES: Final = 4096


def too_large(size: int, limit: int) -> str:
    """The dead letter's reason for a ``record`` field longer than ``TPX_MAX_RECORD_BYTES``."""
    return f"record is {size} bytes, more than the {limit} allowed (TPX_MAX_RECORD_BYTES)"


def decode_page(
    entries: Iterable[tuple[bytes, list[bytes] | None]],
    out: list[Position],
    now_us: int,
    max_future_us: int,
    max_record_bytes: int,
) -> tuple[list[tuple[bytes, list[bytes], str]], list[bytes], int]:
    """Decode a page of stream entries as Redis sends them: ``(id, [name, value, ...])``.

    Positions are appended to ``out``; returns the entries that are not valid records
    (id, fields, the decode error's message), the ids whose fields are None (deleted
    from the stream while pending) and the length of the page's longest ``record`` field
    when it exceeds :data:`SMALL_RECORD_BYTES` (else 0). A ``record`` longer than
    ``max_record_bytes`` is a failure, not parsed. The reader's path: the gateway's layout is
    recognised by one C-level comparison of the names (any other goes through
    :func:`contract_fields`) and the decoder is entered with no call in between (-7 % decoder
    instructions against a call per entry). The fast/stdlib parse and the nesting guard repeat
    :func:`decode_values` inline on purpose: a call per entry is what this loop saves.
    """
    append = out.append
    failures: list[tuple[bytes, list[bytes], str]] = []
    vanished: list[bytes] = []
    device: bytes | None
    raw: bytes | None
    received: bytes | None
    largest = 0
    # only a record longer than every one before it (and than SMALL_RECORD_BYTES) is looked at
    measured = min(SMALL_RECORD_BYTES, max_record_bytes)
    for entry_id, flat in entries:
        if flat is None:
            vanished.append(entry_id)
            continue
        if flat[::2] == _GATEWAY_NAMES:
            device, raw, received = flat[1], flat[3], flat[7]
        else:
            device, raw, received = contract_fields(flat)
        if raw is not None and len(raw) > measured:
            size = len(raw)
            largest = max(largest, size)
            if size > max_record_bytes:
                failures.append((entry_id, flat, too_large(size, max_record_bytes)))
                continue
            measured = size
        try:
            try:
                append(_decode(entry_id, device, raw, received, now_us, max_future_us, True))
            except _WideIntegerError:
                append(_decode(entry_id, device, raw, received, now_us, max_future_us, False))
        except DecodeError as exc:
            failures.append((entry_id, flat, str(exc)))
        except RecursionError:  # a guard: the nesting check keeps every walk shallow
            failures.append((entry_id, flat, str(_too_deep("record"))))
        except Exception as exc:  # a decoder bug: this record is set aside, not the reader killed
            failures.append((entry_id, flat, decoder_bug(entry_id, exc)))
    return failures, vanished, largest


def decoder_bug(entry_id: bytes, exc: Exception) -> str:
    """Log an error the decoder did not foresee (a bug) and give the dead letter's reason.

    Raised out of the reader it would kill it, and again at every restart: the pending re-read
    meets the same entry first (a ``__bigint__`` too long for ``int()`` once did exactly that).
    As a dead letter the record waits, intact, for the fix and a replay.
    """
    log.error("decoder bug on entry %s", entry_id.decode(errors="replace"), exc_info=exc)
    return f"the decoder failed ({type(exc).__name__}: {first_line(exc)}): a tpx bug; replay after the fix"


def decode_values(
    entry_id: bytes,
    device: bytes | None,
    record: bytes | None,
    received: bytes | None,
    *,
    now_us: int,
    max_future_us: int,
    max_record_bytes: int | None = None,
) -> Position:
    """:func:`decode_entry` for the three fields the contract reads, given one by one."""
    if max_record_bytes is not None and record is not None and len(record) > max_record_bytes:
        raise DecodeError(too_large(len(record), max_record_bytes))
    try:
        try:
            return _decode(entry_id, device, record, received, now_us, max_future_us, fast=True)
        except _WideIntegerError:
            return _decode(entry_id, device, record, received, now_us, max_future_us, fast=False)
    except RecursionError:  # a guard: the nesting check keeps every walk shallow
        raise _too_deep("record") from None
    except DecodeError:
        raise
    except Exception as exc:  # a decoder bug: the same verdict as on the reader's path
        raise DecodeError(decoder_bug(entry_id, exc)) from exc


def _decode(  # noqa: PLR0912, PLR0915  (the hot path: inlined on purpose, slow paths in helpers)
    entry_id: bytes,
    device: bytes | None,
    raw: bytes | None,
    received: bytes | None,
    now_us: int,
    max_future_us: int,
    fast: bool,
) -> Position:
    if device is None:
        raise DecodeError("device_id is missing")
    # an IMEI (digits only, ASCII for bytes.isdigit) needs no regex
    if not (device.isdigit() and len(device) <= 64) and DEVICE_ID_RE.fullmatch(device) is None:
        raise DecodeError(f"device_id is invalid (1-64 of A-Z a-z 0-9 . _ : -): {_show(device)}")
    if raw is None:
        raise DecodeError("record is missing")
    if fast:
        try:
            rec = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if str(exc).startswith(_ORJSON_TOO_DEEP):
                raise _too_deep("record") from None
            raise DecodeError(f"record: not valid JSON ({exc})") from None
    else:
        rec = _parse_stdlib(raw)
    # before any walk or message: both parsers stop deeper than MAX_NESTING, each at its own depth
    if len(raw) >= _NESTING_MIN_BYTES and raw.count(b"[") + raw.count(b"{") > MAX_NESTING:
        _check_nesting(rec)
    if type(rec) is not dict:
        raise DecodeError(f"record must be a JSON object, got {_show(rec)}")

    get = rec.get
    ts = get("ts")
    if type(ts) is int:
        ts_us = ts * 1000
        if not MIN_TS_US <= ts_us <= now_us + max_future_us:
            ts_us = _timestamp_us(ts, now_us, max_future_us)  # raises the precise error
    else:
        if "ts" not in rec:
            raise DecodeError("record.ts is missing")
        ts_us = _timestamp_us(_scalar(rec, "ts"), now_us, max_future_us)
    lat = get("lat")
    if type(lat) is not float:
        lat = _required_number(rec, "lat")
    lon = get("lon")
    if type(lon) is not float:
        lon = _required_number(rec, "lon")
    if not -90.0 <= lat <= 90.0:
        raise DecodeError(f"record.lat out of range -90..90: {_show(get('lat'))}")
    if not -180.0 <= lon <= 180.0:
        raise DecodeError(f"record.lon out of range -180..180: {_show(get('lon'))}")
    alt = get("alt")
    if alt is not None:
        if type(alt) is not float:
            alt = _number(rec, "alt", required=False)
        if alt and not (REAL_TINY <= alt <= REAL_MAX or -REAL_MAX <= alt <= -REAL_TINY):
            alt = _real("alt", alt)  # the rare magnitudes, checked exactly
    angle = get("angle")
    if angle is not None:
        if type(angle) is not float:
            angle = _number(rec, "angle", required=False)
        if angle is not None:
            if not 0.0 <= angle <= 360.0:
                raise DecodeError(f"record.angle out of range 0..360: {_show(get('angle'))}")
            if 0.0 < angle < REAL_TINY:
                angle = _real("angle", angle)
    speed = get("speed")
    if speed is not None:
        if type(speed) is not float:
            speed = _number(rec, "speed", required=False)
        if speed is not None:
            if speed < 0.0:
                raise DecodeError(f"record.speed must be >= 0: {_show(get('speed'))}")
            if speed and not REAL_TINY <= speed <= REAL_MAX:
                speed = _real("speed", speed)
    satellites = get("satellites")
    if satellites is not None and (type(satellites) is not int or not 0 <= satellites <= 255):
        satellites = _integer(rec, "satellites", 0, 255)
    priority = get("priority")
    if priority is not None and (type(priority) is not int or not 0 <= priority <= 2):
        priority = _integer(rec, "priority", 0, 2)
    event_io_id = get("event_io_id")
    if event_io_id is not None and (
        type(event_io_id) is not int or not INT32_MIN <= event_io_id <= INT32_MAX
    ):
        event_io_id = _integer(rec, "event_io_id", INT32_MIN, INT32_MAX)
    attributes = _attributes(get("io"), check_wide=fast)

    received_at_pg = None
    if received is not None:
        if not (received.isdigit() and len(received) <= 15):  # bytes.isdigit(): ASCII 0-9 only
            raise DecodeError(f"received_at must be integer epoch milliseconds: {_show(received)}")
        received_at_pg = int(received) * 1000 - PG_EPOCH_US

    valid = satellites != 0 and not (lat == 0.0 and lon == 0.0)
    return _new_position(
        Position,
        (
            device.decode("ascii"),
            ts_us - PG_EPOCH_US,
            lat,
            lon,
            alt,
            angle,
            speed,
            satellites,
            priority,
            event_io_id,
            valid,
            attributes,
            received_at_pg,
            ts_us,
            entry_id,
        ),
    )
