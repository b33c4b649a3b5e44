"""Configuration: environment variables (``TPX_*``), overridable by command-line flags.

Every setting is a field below; its env var is ``TPX_`` + the field name in
upper case, and its default and meaning are written next to it. ``tpx config``
prints the effective values with passwords masked. Validation happens once, at
start-up: :func:`load` turns every problem into one line of a
:class:`ConfigError`, never a traceback.
"""

from __future__ import annotations

import difflib
import re
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from tpx.streams import dlq_stream

ENV_PREFIX = "TPX_"
#: The highest TCP port number.
MAX_PORT = 65535
#: A table setting is `table` or `schema.table`.
MAX_NAME_PARTS = 2
_SECRET_FIELDS = ("redis_url", "database_url")


class ConfigError(Exception):
    """One or more invalid settings: ``problems`` holds (field, message) per problem, ``lines``
    one line each, naming the env var (the command line adds its flag where it has one)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        self.lines = [f"{env_name(name)}: {message}" for name, message in problems]
        super().__init__("; ".join(self.lines))


#: ``TPX_*`` variables that are not settings yet are tpx's: the fail points, the image compose runs,
#: the CI cache, and (prefix
#: ``TPX_TEST_``) what the test suite reads (its servers, Node and Directus for CI).
OTHER_ENV: frozenset[str] = frozenset({"TPX_FAILPOINTS", "TPX_IMAGE", "TPX_CI_CACHE"})
_TEST_ENV_PREFIX = "TPX_TEST_"


def unknown_env(environ: Mapping[str, str]) -> list[str]:
    """One warning per ``TPX_*`` variable that is no setting (a misspelling is otherwise silent)."""
    known = {env_name(name) for name in Settings.model_fields} | OTHER_ENV
    out = []
    given = (
        n for n in environ if n.upper().startswith(ENV_PREFIX) and not n.upper().startswith(_TEST_ENV_PREFIX)
    )
    for name in sorted(n for n in given if n.upper() not in known):
        near = difflib.get_close_matches(name.upper(), sorted(known), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        out.append(f"{name} is not a tpx setting; ignored{hint}")
    return out


class Settings(BaseSettings):
    """All of tpx's settings. Env var: ``TPX_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # --- connections ---
    #: Redis holding the telemetry stream. ``redis://``, ``rediss://`` or ``unix://``.
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: PostgreSQL (TimescaleDB optional) holding ``positions``: a URL or a key=value DSN.
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    #: Schema that holds ``positions`` and tpx's bookkeeping tables (created if missing).
    db_schema: str = "public"

    # --- the stream ---
    #: Input stream key; dead letters go to ``<stream>:dlq``.
    stream: str = "telemetry:t"
    #: Consumer group shared by every tpx instance.
    group: str = "processor"
    #: This instance's consumer name. Default: the host name, so a restarted
    #: container finds its own pending entries again.
    consumer: str = Field(default_factory=socket.gethostname)

    # --- batching and memory bounds ---
    #: Entries asked for per XREADGROUP call.
    read_count: int = Field(default=1000, ge=1, le=100_000)
    #: A batch holds at most this many records. A record waits for a free writer, not for a
    #: timer: an idle writer takes what the reader holds at once; records accumulate only while
    #: every writer is busy (or a backlog is read) ...
    batch_size: int = Field(default=2000, ge=1, le=100_000)
    #: ... and then a partial batch waits at most this long (ms): the ceiling of its wait, not
    #: its floor.
    batch_max_latency_ms: int = Field(default=200, ge=1, le=60_000)
    #: Batches the reader may queue ahead of the writers; then it waits (bounded memory).
    queue_batches: int = Field(default=4, ge=1, le=1000)
    #: Writer threads (each holds one Postgres connection while writing).
    writers: int = Field(default=2, ge=1, le=64)
    #: Devices whose state is kept in memory (LRU beyond that).
    device_cache_size: int = Field(default=100_000, ge=1)
    #: Records whose ``ts`` is more than this many seconds ahead of our clock are poison.
    max_future_s: int = Field(default=86_400, ge=0)
    #: A ``record`` field longer than this (bytes) is dead-lettered (stage ``decode``) unparsed:
    #: one record's cost in memory is bounded (1 MiB: Kafka's default message size; ~3,000 fixes).
    max_record_bytes: int = Field(default=1 << 20, ge=1024, le=512 << 20)
    #: Record bytes per page read from Redis (its COUNT shrinks to fit: Redis has no byte limit).
    page_bytes: int = Field(default=64 << 20, ge=64 << 10)
    #: Record bytes queued ahead of the writers; a batch holds at most queue_bytes / queue_batches.
    queue_bytes: int = Field(default=64 << 20, ge=64 << 10)

    # --- TimescaleDB (ignored, with a log line, where positions is an ordinary table) ---
    #: Compress chunks older than this ("30d", "12h"; empty: no compression policy). Must be
    #: at least ``late_window``: a late record must never hit a compressed chunk.
    compress_after: str = ""
    #: Drop chunks older than this ("365d"; empty: keep everything).
    retain_for: str = ""
    #: How late a record may arrive and still be written to an uncompressed chunk.
    late_window: str = "7d"

    # --- the domain stage: geofence membership and timing records (Directus-owned tables) ---
    #: ``auto``: on when both tables exist (the start-up log says which); ``on``: a missing table
    #: or column is one line naming it and exit 2; ``off``: tpx writes positions only.
    domain: Literal["auto", "on", "off"] = "auto"
    #: ``true``: ``tpx serve`` writes no timing record itself; each batch only queues its valid
    #: fixes (a row of tpx_domain_queue a batch, in the positions' transaction) and ``tpx
    #: domain``, a process of its own, writes their timing records, so that the domain never
    #: slows the positions.
    #: ``false``: the writers compute them in the positions' transaction.
    domain_defer: bool = False
    #: ``tpx domain`` lowers its own CPU priority by this much (``nice``) at start and, while
    #: serve has a backlog, takes a tenth of its time in passes a tenth as large, so that on a
    #: host it shares with ``tpx serve`` (or PostgreSQL) the positions go first; 0: neither (a
    #: host of its own).
    domain_nice: int = Field(default=10, ge=0, le=19)
    #: The geofences table (schema-qualified allowed, e.g. ``cms.geofences``); tpx only reads it.
    geofences_table: str = "geofences"
    #: The timing records table (schema-qualified allowed); tpx inserts and deletes its own rows.
    timing_table: str = "timing_records"
    #: Geofence edits, additions and ``active`` changes are picked up within this many seconds
    #: (and at once on ``tpx geofences --reload``).
    geofences_reload_s: float = Field(default=10.0, gt=0, le=86_400)
    #: A fix implying more than this speed (km/h) from the previous kept fix is not on the track.
    max_speed_kmh: float = Field(default=500.0, gt=0, le=100_000)
    #: How late (behind the device's newest fix) a fix may arrive and still change timing
    #: records; a later one is stored in positions and counted. At most ``late_window``.
    domain_late_window: str = "10m"
    #: At most this many recent fixes per device are kept in memory to replay late ones (an older
    #: late fix is replayed from positions, one query for the batch): ~400 bytes each with its events, so
    #: 16 is ~7 KB a device (measured), 700 MB for TPX_DEVICE_CACHE_SIZE's 100,000 devices.
    domain_max_history: int = Field(default=16, ge=2, le=1_000_000)

    # --- failures and redelivery ---
    #: A record the database refuses is dead-lettered (stage ``write``) once the
    #: stream has delivered it this many times; until then it is redelivered.
    max_deliveries: int = Field(default=3, ge=1, le=1000)
    #: Entries pending (in any consumer) for longer than this (ms) are claimed ...
    claim_idle_ms: int = Field(default=60_000, ge=100)
    #: ... by a sweep at start-up and then every this many seconds.
    claim_interval_s: float = Field(default=15.0, gt=0)
    #: The writers' PostgreSQL ``lock_timeout`` (ms; 0: none): a write waiting this long for a lock
    #: another session holds (``LOCK TABLE``, an idle-in-transaction session) fails and is retried.
    #: 10 s: tpx's own writers wait milliseconds for each other; anything longer is someone else.
    writer_lock_timeout_ms: int = Field(default=10_000, ge=0)
    #: The writers' ``statement_timeout`` (ms; 0: none): a statement running longer is cancelled
    #: and retried. 60 s: some 100 times the COPY of a full batch, so only a wedged one meets it.
    writer_statement_timeout_ms: int = Field(default=60_000, ge=0)
    #: A batch in flight for longer than this (s) makes the instance not ready, naming the writer
    #: and the wait. 30 s: a batch commits in well under a second, even on a busy server.
    writer_stall_s: float = Field(default=30.0, gt=0)

    # --- process ---
    #: Metrics and health listener, ``host:port``; ``off`` disables it.
    http_addr: str = "0.0.0.0:9108"
    #: A bearer token for the HTTP listener (empty: none). When set, ``/devices/*`` (live
    #: positions) needs ``Authorization: Bearer <token>``; ``/healthz`` and ``/readyz`` stay open
    #: for the orchestrator's probes. Never logged; ``tpx config`` shows it as ``***``.
    http_token: str = ""
    #: With ``http_token`` set: require it for ``/metrics`` too (default: metrics stay open, as
    #: most Prometheus set-ups scrape without credentials).
    http_token_metrics: bool = False
    #: Apply pending migrations before serving.
    migrate_on_start: bool = True
    #: On SIGTERM, time allowed for queued batches to be written before exiting (s); the whole
    #: stop takes at most this + SHUTDOWN_TAIL_S (1 s), so 8 s stays inside Docker's 10 s.
    drain_timeout_s: float = Field(default=8.0, gt=0, le=600)
    #: Where a crashing process writes its panic dump (JSON), created if missing.
    panic_dir: str = Field(default_factory=lambda: str(Path(tempfile.gettempdir()) / "tpx-panic"))
    #: Log level: DEBUG, INFO, WARNING, ERROR.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: ``json`` lines, human ``text``, or ``auto`` (text on a terminal, JSON otherwise).
    log_format: Literal["auto", "json", "text"] = "auto"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        import redis.connection  # here, not at the top: `tpx --help` reads this module (-75 ms)

        try:
            redis.connection.parse_url(value)  # type: ignore[no-untyped-call]
        except ValueError as exc:
            raise ValueError(f"not a Redis URL ({mask_url(str(exc))})") from None
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        import psycopg.conninfo  # here, not at the top: `tpx --help` reads this module (-150 ms)

        try:
            psycopg.conninfo.conninfo_to_dict(value)
        except psycopg.ProgrammingError:
            raise ValueError("not a PostgreSQL URL or key=value DSN") from None
        return value

    @field_validator("db_schema", "stream", "group", "consumer")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("compress_after", "retain_for", "late_window", "domain_late_window")
    @classmethod
    def _check_duration(cls, value: str) -> str:
        if value.strip():
            parse_duration(value)
        return value.strip()

    @field_validator("geofences_table", "timing_table")
    @classmethod
    def _check_table_name(cls, value: str) -> str:
        parts = value.split(".")
        if len(parts) > MAX_NAME_PARTS or not all(part.strip() for part in parts):
            raise ValueError("must be a table name or schema.table")
        return value.strip()

    @model_validator(mode="after")
    def _compression_after_late_window(self) -> Settings:
        if parse_duration(self.domain_late_window) > parse_duration(self.late_window):
            raise _cross_setting(
                "domain_late_window",
                f"{self.domain_late_window} must be at most TPX_LATE_WINDOW ({self.late_window})",
            )
        if self.compress_after and parse_duration(self.compress_after) < parse_duration(self.late_window):
            raise _cross_setting(
                "compress_after",
                f"{self.compress_after} must be at least TPX_LATE_WINDOW ({self.late_window}): late "
                "records would land on compressed chunks",
            )
        if (
            self.retain_for
            and self.compress_after
            and parse_duration(self.retain_for) <= parse_duration(self.compress_after)
        ):
            raise _cross_setting(
                "retain_for",
                f"{self.retain_for} must be longer than TPX_COMPRESS_AFTER ({self.compress_after}): "
                "chunks would be dropped before they are compressed",
            )
        return self

    @field_validator("http_addr")
    @classmethod
    def _check_http_addr(cls, value: str) -> str:
        if value.lower() == "off":
            return "off"
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or int(port) > MAX_PORT:
            raise ValueError("must be host:port (port 0 picks a free one) or 'off'")
        del host
        return value

    # --- derived values ---

    @property
    def dlq_stream(self) -> str:
        """The dead-letter stream key (contract §3)."""
        return dlq_stream(self.stream)

    @property
    def http_bind(self) -> tuple[str, int] | None:
        if self.http_addr == "off":
            return None
        host, _, port = self.http_addr.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104

    def http_access(self) -> HttpAccess | None:
        """What the HTTP listener protects, and with which token (None: everything open)."""
        if not self.http_token:
            return None
        return HttpAccess(self.http_token, self.http_token_metrics)

    def masked(self) -> dict[str, Any]:
        """The effective settings with passwords masked, for ``tpx config`` and panic dumps."""
        data = self.model_dump()
        for name in _SECRET_FIELDS:
            data[name] = mask_url(data[name])
        if data["http_token"]:
            data["http_token"] = "***"  # noqa: S105 (the mask, not a password)
        return data


class HttpAccess:
    """The HTTP listener's bearer token, and whether ``/metrics`` needs it too."""

    def __init__(self, token: str, metrics: bool) -> None:
        self.token = token
        self.metrics = metrics

    def __repr__(self) -> str:  # never the token, whatever prints this
        return f"HttpAccess(token=***, metrics={self.metrics})"


_KV_PASSWORD_RE = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def mask_url(text: str) -> str:
    """Hide the password in a URL or key=value DSN (also inside messages that quote one)."""
    text = _KV_PASSWORD_RE.sub(r"\1***", text)

    def _one(match: re.Match[str]) -> str:
        url = match.group(0)
        try:
            parts = urlsplit(url)
        except ValueError:
            return url
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)
        userinfo = netloc[0].split(":", 1)[0]
        return urlunsplit(parts._replace(netloc=f"{userinfo}:***@{netloc[1]}"))

    return re.sub(r"[a-z][a-z0-9+.\-]*://\S+", _one, text)


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``2h``, ``7d``, ``1w``, or combinations like ``1d12h``, in seconds."""
    cleaned = text.strip().lower()
    parts = _DURATION_RE.findall(cleaned)
    if not parts or _DURATION_RE.sub("", cleaned).strip():
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 2h, 7d, 1w)")
    return sum(float(n) * _UNIT[u] for n, u in parts)


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def load(**overrides: Any) -> Settings:
    """Build settings from the environment plus non-None ``overrides`` (command-line flags).

    Raises :class:`ConfigError` with one line per invalid setting.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            if not err["loc"]:  # a cross-setting error names its setting (_cross_setting)
                ctx = err.get("ctx") or {}
                problems.append((str(ctx.get("field", "?")), str(ctx.get("message", err["msg"]))))
                continue
            field = str(err["loc"][0])
            message = str(err["msg"]).removeprefix("Value error, ")
            value = repr(err.get("input"))
            shown = "" if field in _SECRET_FIELDS or value in message else f" (got {value})"
            problems.append((field, f"{message}{shown}"))
        raise ConfigError(problems) from None


def _cross_setting(name: str, message: str) -> PydanticCustomError:
    """A problem found by comparing settings, charged to ``name`` (pydantic gives it no field)."""
    return PydanticCustomError("cross_setting", "{message}", {"field": name, "message": message})
