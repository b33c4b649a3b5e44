"""The dead-letter stream: list, show, replay, drain, reasons, export, delete, purge (CONTRACT.md §3).

Replaying a dead letter adds its original fields (without ``dlq_*``) back to
the input stream with ``replays`` set to one more than it was, and deletes the
dead letter: both in one Lua script, so each entry moves atomically and two
operators replaying at once never replay one entry twice.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import redis

from tpx.config import Settings
from tpx.contract import (
    AT,
    CONSUMER,
    DELIVERIES,
    ERROR,
    FIELD_PREFIX,
    SOURCE_ID,
    STAGE,
    STAGE_DECODE,
    ReplayOutcome,
)
from tpx.errors import OpsError
from tpx.ops.inspect import entry_age_s
from tpx.streams import as_text, entry_ms

_ID_RE = re.compile(r"\d+-\d+")
#: Dead letters per XRANGE page: a dead letter is a record plus its reason (~1 KB), so a page
#: stays near half a megabyte however large the dead-letter stream grows.
PAGE = 500
#: What the replay script reads as "no --max-replays": replay however often it was replayed.
_NO_REPLAY_LIMIT = -1

#: KEYS[1] dead-letter stream, KEYS[2] input stream;
#: ARGV[1] dead letter id, ARGV[2] max replays (-1: no limit)
_REPLAY_LUA = """
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return {'missing', ''} end
local fields = found[1][2]
local out = {}
local replays = 0
local stage = ''
for i = 1, #fields, 2 do
  local k, v = fields[i], fields[i + 1]
  if k == 'replays' then
    replays = tonumber(v) or 0
  elseif k == 'dlq_stage' then
    stage = v
  elseif string.sub(k, 1, 4) ~= 'dlq_' then
    table.insert(out, k)
    table.insert(out, v)
  end
end
local limit = tonumber(ARGV[2])
if limit >= 0 and replays >= limit then return {'refused', tostring(replays), stage} end
table.insert(out, 'replays')
table.insert(out, tostring(replays + 1))
local new_id = redis.call('XADD', KEYS[2], '*', unpack(out))
redis.call('XDEL', KEYS[1], ARGV[1])
return {'replayed', new_id, stage}
"""


@dataclass
class DeadLetterView:
    id: str
    source_id: str
    stage: str
    error: str
    deliveries: int
    consumer: str
    at_ms: int
    device_id: str
    replays: int
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def age_s(self) -> float | None:
        return entry_age_s(self.id)

    def original(self) -> dict[str, str]:
        return {k: v for k, v in self.fields.items() if not k.startswith(FIELD_PREFIX)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source_id": self.source_id,
            "stage": self.stage,
            "error": self.error,
            "deliveries": self.deliveries,
            "consumer": self.consumer,
            "at_ms": self.at_ms,
            "device_id": self.device_id,
            "replays": self.replays,
            "fields": self.fields,
        }


def _view(entry_id: Any, raw: dict[Any, Any] | None) -> DeadLetterView:
    fields = {as_text(k): as_text(v) for k, v in (raw or {}).items()}

    def number(key: str) -> int:
        try:
            return int(fields.get(key, "0"))
        except ValueError:
            return 0

    return DeadLetterView(
        id=as_text(entry_id),
        source_id=fields.get(SOURCE_ID, ""),
        stage=fields.get(STAGE, ""),
        error=fields.get(ERROR, ""),
        deliveries=number(DELIVERIES),
        consumer=fields.get(CONSUMER, ""),
        at_ms=number(AT),
        device_id=fields.get("device_id", ""),
        replays=number("replays"),
        fields=fields,
    )


def check_id(entry_id: str) -> str:
    if not _ID_RE.fullmatch(entry_id):
        raise ValueError(f"not a stream entry id: {entry_id!r} (expected <ms>-<seq>, e.g. 1700000000000-0)")
    return entry_id


def iter_letters(
    client: redis.Redis,
    settings: Settings,
    stage: str | None = None,
    device: str | None = None,
    newest_first: bool = False,
) -> Iterator[DeadLetterView]:
    """Every dead letter matching the filters, page by page."""
    key = settings.dlq_stream
    cursor: str | None = None
    while True:
        if newest_first:
            page = client.xrevrange(key, max=f"({cursor}" if cursor else "+", min="-", count=PAGE)
        else:
            page = client.xrange(key, min=f"({cursor}" if cursor else "-", max="+", count=PAGE)
        if not page:
            return
        for entry_id, raw in page:
            letter = _view(entry_id, raw)
            if (stage is None or letter.stage == stage) and (device is None or letter.device_id == device):
                yield letter
        cursor = as_text(page[-1][0])
        if len(page) < PAGE:
            return


def matching_ids(
    client: redis.Redis, settings: Settings, stage: str | None = None, device: str | None = None
) -> list[str]:
    """The ids of every dead letter matching the filters, oldest first (what ``--all`` replays)."""
    return replay_plan(client, settings, stage, device).ids


@dataclass
class ReplayPlan:
    """What replaying every matching dead letter moves: their ids (oldest first), and how many of
    them are decode-stage letters (those come straight back: :data:`DECODE_REPLAY_WARNING`)."""

    ids: list[str]
    decode: int


def replay_plan(
    client: redis.Redis, settings: Settings, stage: str | None = None, device: str | None = None
) -> ReplayPlan:
    """Every dead letter matching the filters, as :func:`replay` takes them (the dashboard's
    ``R`` asks with its counts, then replays exactly those)."""
    ids, decode = [], 0
    for letter in iter_letters(client, settings, stage, device):
        ids.append(letter.id)
        decode += letter.stage == STAGE_DECODE
    return ReplayPlan(ids, decode)


def length(client: redis.Redis, settings: Settings) -> int:
    """How many dead letters the stream holds."""
    return int(client.xlen(settings.dlq_stream))


def list_letters(
    client: redis.Redis,
    settings: Settings,
    stage: str | None = None,
    device: str | None = None,
    limit: int = 50,
) -> list[DeadLetterView]:
    out = []
    for letter in iter_letters(client, settings, stage, device, newest_first=True):
        out.append(letter)
        if len(out) >= limit:
            break
    return out


def show(client: redis.Redis, settings: Settings, entry_id: str) -> DeadLetterView:
    found = client.xrange(settings.dlq_stream, check_id(entry_id), entry_id, count=1)
    if not found:
        raise OpsError(f"no dead letter {entry_id} in {settings.dlq_stream}")
    return _view(found[0][0], found[0][1])


#: What replaying a decode-stage dead letter changes: nothing but its replays count. The decoder
#: refuses the same bytes again unless tpx's decoder or the gateway's records were fixed.
DECODE_REPLAY_WARNING = (
    "decode stage: nothing changed since it was dead-lettered; it comes straight back unless "
    "the decoder (a tpx upgrade) or the record was fixed"
)


def decode_replay_warning(count: int, verb: str) -> str:
    """``replayed 3 letters of the decode stage: nothing changed …``: what `tpx dlq replay` prints
    and the dashboard's confirmation says (``verb``: replayed, would replay)."""
    return f"{verb} {count:,} letter{'' if count == 1 else 's'} of the {DECODE_REPLAY_WARNING}"


@dataclass
class ReplayResult:
    id: str
    outcome: ReplayOutcome
    new_id: str = ""
    replays: int = 0
    stage: str = ""
    #: set for decode-stage letters replayed (or to be): :data:`DECODE_REPLAY_WARNING`
    warning: str = ""

    def __post_init__(self) -> None:
        if self.stage == STAGE_DECODE and self.outcome in ("replayed", "would-replay"):
            self.warning = DECODE_REPLAY_WARNING


def replay_one(
    client: redis.Redis, settings: Settings, entry_id: str, max_replays: int | None, dry_run: bool = False
) -> ReplayResult:
    check_id(entry_id)
    if dry_run:
        found = client.xrange(settings.dlq_stream, entry_id, entry_id, count=1)
        if not found:
            return ReplayResult(entry_id, "missing")
        letter = _view(found[0][0], found[0][1])
        refused = max_replays is not None and letter.replays >= max_replays
        would: ReplayOutcome = "would-refuse" if refused else "would-replay"
        return ReplayResult(entry_id, would, replays=letter.replays, stage=letter.stage)
    script = client.register_script(_REPLAY_LUA)
    outcome, value, *stage = cast(
        list[bytes],
        script(
            keys=[settings.dlq_stream, settings.stream],
            args=[entry_id, _NO_REPLAY_LIMIT if max_replays is None else max_replays],
        ),
    )
    result = ReplayResult(  # the script's first value is an outcome; "missing" has no stage
        entry_id, cast(ReplayOutcome, as_text(outcome)), stage=as_text(stage[0]) if stage else ""
    )
    if result.outcome == "replayed":
        result.new_id = as_text(value)
    elif result.outcome == "refused":
        result.replays = int(as_text(value))
    return result


def replay(
    client: redis.Redis,
    settings: Settings,
    ids: list[str],
    max_replays: int | None = None,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> list[ReplayResult]:
    results = []
    for entry_id in ids:
        results.append(replay_one(client, settings, entry_id, max_replays, dry_run))
        if progress:
            progress(1)
    return results


#: The values in an error message: quoted strings, lists, objects, and numbers standing alone (not
#: inside a word or a range such as ``1-64`` or ``0-9``, nor a character class such as
#: ``[a-z0-9-]``: those are the message's own text).
_VALUE_RE = re.compile(
    r"(\"(?:[^\"\\]|\\.)*\"|'[^']*'|b'[^']*'"
    r"|(?<![\w.-])-?\d+(?:\.\d+)?(?:e[+-]?\d+)?(?![\w.]|-\d)"
    r"|\[(?:\s*(?:\"[^\"]*\"|-?\d[\d.e+-]*|true|false|null)\s*,?)*\]|\{.*\})"
)


def reason(error: str) -> str:
    """An error message with its values blanked, so alike failures count together."""
    return _VALUE_RE.sub("…", error).strip()


def histogram(letters: list[DeadLetterView]) -> list[tuple[str, str, int]]:
    """(stage, reason, count), most frequent first."""
    counts = Counter((letter.stage, reason(letter.error)) for letter in letters)
    return [(stage, why, n) for (stage, why), n in counts.most_common()]


def export(
    client: redis.Redis,
    settings: Settings,
    out: IO[str],
    stage: str | None = None,
    device: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write matching dead letters as JSON lines; return how many."""
    count = 0
    for letter in iter_letters(client, settings, stage, device):
        out.write(json.dumps(letter.to_dict()) + "\n")
        count += 1
        if progress:
            progress(1)
    return count


def export_file(
    client: redis.Redis, settings: Settings, path: Path, overwrite: bool = False, **kw: Any
) -> int:
    """:func:`export` to ``path``; an existing file raises FileExistsError unless ``overwrite``."""
    with path.open("w" if overwrite else "x", encoding="utf-8") as out:
        return export(client, settings, out, **kw)


@dataclass
class DeleteResult:
    deleted: list[str]
    missing: list[str]
    dry_run: bool


def delete(client: redis.Redis, settings: Settings, ids: list[str], dry_run: bool = False) -> DeleteResult:
    """Delete the dead letters ``ids`` (an unfixable poison, once exported); missing ones named."""
    for entry_id in ids:
        check_id(entry_id)
    pipe = client.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xrange(settings.dlq_stream, entry_id, entry_id, count=1)
    found = pipe.execute() if ids else []
    present = [entry_id for entry_id, hit in zip(ids, found, strict=True) if hit]
    if present and not dry_run:
        client.xdel(settings.dlq_stream, *present)
    return DeleteResult(present, [i for i in ids if i not in present], dry_run)


@dataclass
class PurgeResult:
    #: dead letters older than this went (None: no --older-than)
    cutoff_ms: int | None
    removed: int
    dry_run: bool
    #: the --stage/--device/--reason filters given
    filters: dict[str, str] = field(default_factory=dict)


def purge_matching(
    client: redis.Redis,
    settings: Settings,
    filters: dict[str, str],
    older_than_s: float | None = None,
    dry_run: bool = False,
) -> PurgeResult:
    """Delete the dead letters matching ``filters`` (stage, device, reason: a text the error
    contains) and, with ``older_than_s``, dead-lettered that long ago."""
    cutoff_ms = None if older_than_s is None else int((time.time() - older_than_s) * 1000)
    wanted = filters.get("reason")
    chosen = [
        letter.id
        for letter in iter_letters(client, settings, filters.get("stage"), filters.get("device"))
        if (wanted is None or wanted in letter.error)
        and (cutoff_ms is None or entry_ms(letter.id) < cutoff_ms)
    ]
    removed = len(chosen)
    if not dry_run:
        removed = sum(
            int(client.xdel(settings.dlq_stream, *chosen[i : i + PAGE])) for i in range(0, len(chosen), PAGE)
        )
    return PurgeResult(cutoff_ms, removed, dry_run, filters)


def purge(client: redis.Redis, settings: Settings, older_than_s: float, dry_run: bool = False) -> PurgeResult:
    """Delete dead letters added more than ``older_than_s`` ago (their ids are their add times)."""
    cutoff_ms = int((time.time() - older_than_s) * 1000)
    if dry_run:
        count = sum(1 for _ in _ids_before(client, settings.dlq_stream, cutoff_ms))
        return PurgeResult(cutoff_ms, count, True)
    removed = int(client.xtrim(settings.dlq_stream, minid=f"{cutoff_ms}-0", approximate=False))
    return PurgeResult(cutoff_ms, removed, False)


def _ids_before(client: redis.Redis, key: str, cutoff_ms: int) -> Iterator[str]:
    cursor = "-"
    while True:
        page = client.xrange(key, min=cursor, max=f"({cutoff_ms}-0", count=PAGE)
        if not page:
            return
        for entry_id, _ in page:
            yield as_text(entry_id)
        if len(page) < PAGE:
            return
        cursor = f"({as_text(page[-1][0])}"
