"""The control protocol: one typed request, shared by the engine and the ops commands.

An ops command publishes a :class:`ControlRequest` as JSON on the stream's
control channel (:func:`tpx.keys.control_channel`); every instance's
``tpx-control`` thread parses it with :func:`parse` and pushes its answer to
``reply_to``. Every instance subscribes, so a message that broke the parser
would break them all at once: :func:`parse` turns anything that is not a
well-formed request (too large, not UTF-8, not JSON, nested too deep, not an
object, an unknown op, a wrong type, a value out of range, a ``reply_to``
outside this stream's reply keys) into one :class:`BadRequestError` with a one-line
reason, and nothing else.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Final, Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tpx import keys
from tpx.records import DEVICE_ID_RE

#: What an instance can be asked: drop a device's cached state, report it, report the most
#: recently active ones, reload what its domain stage reads from the CMS (the geofences), or
#: just answer (who is listening).
Op = Literal["rehydrate", "device", "devices", "reload", "ping"]
OPS: Final[tuple[str, ...]] = get_args(Op)
#: The ops that name a device (``device`` is required and must be a contract device_id).
DEVICE_OPS: Final = frozenset({"rehydrate", "device"})

#: A request is ~200 bytes; anything much larger is not one of ours, and the bound keeps the
#: parser's work (and a deep nesting's) small.
MAX_REQUEST_BYTES: Final = 4096
#: ``devices`` answers with this many states unless asked otherwise (what the dashboard shows).
DEVICES_LIMIT_DEFAULT: Final = 500
#: At most this many states in one ``devices`` reply: a state is ~250 bytes of JSON, so a
#: reply stays near 1 MB and one instance's answer cannot fill Redis.
DEVICES_LIMIT_MAX: Final = 5000
#: A request id: what the ops side sends (a uuid4's 32 hex digits) or any short token like it.
REQUEST_ID_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}$"
#: Seconds an answer waits in its reply key: the ops side waits a few seconds, then it expires.
REPLY_TTL_S: Final = 60
#: How many of a refused request's problems a warning names (each is ~40 characters).
REASONS_SHOWN: Final = 3
#: How much of a refused message a warning quotes.
EXCERPT_BYTES: Final = 60

_DEVICE_PATTERN: Final = f"^(?:{DEVICE_ID_RE.pattern.decode()})?$"  # the contract's, or empty
#: What a field that does not match its pattern should have been (pydantic would quote the regex).
_PATTERN_MEANS: Final = {
    "device": "not a device_id (1-64 of A-Z a-z 0-9 . _ : -)",
    "id": "not a request id (1-64 of A-Z a-z 0-9 _ -)",
}


class BadRequestError(ValueError):
    """A control message that is not a well-formed request; ``str()`` is one short line."""


class ControlRequest(BaseModel):
    """One request to the running instances. Unknown keys are ignored (newer ops clients)."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    op: Op
    id: str = Field(pattern=REQUEST_ID_PATTERN)
    device: str = Field("", pattern=_DEVICE_PATTERN)
    limit: int = Field(DEVICES_LIMIT_DEFAULT, ge=1, le=DEVICES_LIMIT_MAX)
    reply_to: str | None = None  # None: do it, answer nobody

    @model_validator(mode="after")
    def _device_named(self) -> Self:
        if self.op in DEVICE_OPS and not self.device:
            raise ValueError(f"op {self.op} needs a device")
        return self

    @classmethod
    def new(cls, stream: str, op: Op, device: str = "", limit: int = DEVICES_LIMIT_DEFAULT) -> ControlRequest:
        """A request with a fresh id, answered on this stream's reply key for that id."""
        request_id = uuid.uuid4().hex
        reply_to = keys.reply_list(stream, request_id)
        return _validated(lambda: cls(op=op, id=request_id, device=device, limit=limit, reply_to=reply_to))

    def to_json(self) -> str:
        return self.model_dump_json()


def parse(data: bytes, stream: str) -> ControlRequest:
    """The request in a control message for ``stream``; :class:`BadRequestError` if it is not one."""
    if len(data) > MAX_REQUEST_BYTES:
        raise BadRequestError(f"{len(data)} bytes, more than the {MAX_REQUEST_BYTES} a request may have")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequestError(f"not UTF-8 (byte {exc.start})") from None
    request = _validated(lambda: ControlRequest.model_validate_json(text))
    own = keys.reply_list(stream, request.id)
    if request.reply_to is not None and request.reply_to != own:
        raise BadRequestError(f"reply_to {excerpt(request.reply_to.encode())} is not this stream's {own}")
    return request


def excerpt(data: bytes) -> str:
    """A refused message, quoted for a log line: escaped, one line, at most EXCERPT_BYTES."""
    shown = repr(data[:EXCERPT_BYTES])
    return shown if len(data) <= EXCERPT_BYTES else f"{shown}… ({len(data)} bytes)"


def _validated(build: Callable[[], ControlRequest]) -> ControlRequest:
    try:
        return build()
    except ValidationError as exc:
        raise BadRequestError(_reason(exc)) from None


def _reason(exc: ValidationError) -> str:
    """What pydantic found wrong, as ``field: message; …`` (never the input's value)."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    problems = []
    for error in errors[:REASONS_SHOWN]:
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "string_pattern_mismatch":
            message = _PATTERN_MEANS.get(where, message)
        problems.append(f"{where}: {message}" if where else message)
    more = f" (and {len(errors) - REASONS_SHOWN} more)" if len(errors) > REASONS_SHOWN else ""
    return "; ".join(problems) + more
