"""What every `tpx` command shares: the settings flags (declared once), one-line failures, exit codes.

A command names the settings it takes, and whether it answers in JSON, in one decorator::

    @with_settings(*GROUP_OPTIONS, json=True)
    def status(cmd: Invocation, watch: bool = False) -> None:
        with cmd.redis() as client:
            ...

:func:`with_settings` adds those flags (``--redis-url``, ``--stream``, ``--group``, ``--json``) to
the command's own parameters and hands the function one :class:`Invocation` holding them; its
:attr:`~Invocation.settings` are loaded (environment + flags) when first read, and its connections
are made when the command asks. Each flag is declared once, in :data:`SETTINGS_OPTIONS`: giving
the dead-letter commands ``--group`` is one edit of :data:`DLQ_OPTIONS`.

Heavy modules (redis, psycopg, the ops functions, rich) are imported where a command runs, never
at import time, so ``tpx --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import json
import logging
import typing
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any, Final, NoReturn, TypeVar

import typer

from tpx import exitcodes
from tpx.config import ConfigError, Settings, env_name, load, mask_url, unknown_env
from tpx.errors import OpsError, first_line

if TYPE_CHECKING:
    import redis

log = logging.getLogger("tpx")
T = TypeVar("T")


#: Whether the running command answers in JSON (set by :func:`with_settings` for the call):
#: its errors are then a JSON object on stdout as well as the line on stderr.
_ERRORS_AS_JSON: contextvars.ContextVar[bool] = contextvars.ContextVar("tpx_errors_as_json", default=False)
#: The settings fields the running command takes as flags: an invalid setting names its flag only
#: when the command has one.
_COMMAND_FIELDS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("tpx_fields", default=())


def fail(message: str, code: int = exitcodes.ERROR, lines: list[str] | None = None) -> NoReturn:
    """One ``tpx: …`` line per message on stderr (and, under --json, ``{"error", "exit_code"}`` on
    stdout), then exit ``code``: the one place errors become exit codes."""
    for line in lines or [message]:
        typer.echo(f"tpx: {line}", err=True)
    if _ERRORS_AS_JSON.get():
        error: dict[str, Any] = {"error": message, "exit_code": code}
        if lines:
            error["errors"] = lines
        typer.echo(json.dumps(error))
    raise typer.Exit(code)


def guarded(fn: Callable[[], T], settings: Settings | None = None) -> T:
    """Run ``fn``; turn the failures a user can hit into one line and an exit code."""
    import psycopg
    import redis

    try:
        return fn()
    except ConfigError as exc:
        lines = [f"invalid setting {_setting_name(name)}: {message}" for name, message in exc.problems]
        fail("; ".join(lines), exitcodes.USAGE, lines)
    except redis.AuthenticationError as exc:  # a ConnectionError, but retrying will not help
        where = mask_url(settings.redis_url) if settings else "Redis"
        fail(f"Redis at {where} refused tpx: {exc} (fix TPX_REDIS_URL)", exitcodes.USAGE)
    except redis.ConnectionError as exc:
        where = mask_url(settings.redis_url) if settings else "Redis"
        fail(f"cannot reach Redis at {where}: {exc}", exitcodes.UNAVAILABLE)
    except redis.TimeoutError as exc:
        fail(f"Redis timed out: {exc}", exitcodes.UNAVAILABLE)
    except OpsError as exc:
        fail(str(exc), exitcodes.ERROR)
    except ValueError as exc:  # a malformed argument (entry id, duration...)
        fail(str(exc), exitcodes.USAGE)
    except redis.ResponseError as exc:
        fail(f"Redis refused the command: {exc}", exitcodes.ERROR)
    except psycopg.OperationalError as exc:  # 2 when the server said no, 3 when it did not answer
        code, message = exitcodes.postgres_connect_failure(exc, settings.database_url if settings else None)
        fail(message, code)
    except psycopg.Error as exc:
        fail(f"PostgreSQL error: {mask_url(first_line(exc))}", exitcodes.ERROR)


def _setting_name(field: str) -> str:
    """``TPX_X / --x`` when the running command takes the flag ``--x``, else ``TPX_X``."""
    if field not in _COMMAND_FIELDS.get():
        return env_name(field)
    option = typing.get_args(SETTINGS_OPTIONS[field])[1]
    # typer reads Option's first argument as a declaration under Annotated: it sits in .default
    given = [option.default, *option.param_decls] if isinstance(option.default, str) else option.param_decls
    declared = [d for d in given if d.startswith("--")]
    flag = declared[0].split("/", 1)[0] if declared else "--" + field.replace("_", "-")
    return f"{env_name(field)} / {flag}"


def settings_from(**overrides: Any) -> Settings:
    """Settings from the environment plus the non-None ``overrides``; exit 2 when one is invalid.
    A ``TPX_*`` variable that is no setting gets one warning line on stderr."""
    import os

    for warning in unknown_env(os.environ):
        typer.echo(f"tpx: warning: {warning}", err=True)
    return guarded(lambda: load(**overrides))


def emit(data: Any, indent: int | None = 2) -> None:
    """``data`` as JSON on stdout (datetimes and the like as their text)."""
    typer.echo(json.dumps(data, indent=indent, default=str))


class Invocation:
    """One run of a command: the settings flags it was given, and whether it answers in JSON."""

    def __init__(self, overrides: dict[str, Any], as_json: bool) -> None:
        self.overrides = overrides
        self.as_json = as_json
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        """The environment plus the flags, loaded on first use (exit 2 when invalid)."""
        if self._settings is None:
            self._settings = settings_from(**self.overrides)
        return self._settings

    def settings_with(self, **more: Any) -> Settings:
        """The settings with more overrides than the flags (the demo's embedded servers)."""
        self._settings = settings_from(**{**self.overrides, **more})
        return self._settings

    def answer(self, data: Any, show: Callable[[], None]) -> None:
        """Answer with ``data`` as JSON under --json, else with ``show()`` (the human rendering)."""
        if self.as_json:
            emit(data)
        else:
            show()

    def guarded(self, fn: Callable[[], T]) -> T:
        """:func:`guarded`, naming this command's servers in the one line."""
        return guarded(fn, self.settings)

    def start(self, start: Callable[[], None]) -> None:
        """Start an engine (`tpx serve`, `tpx demo`): a start-up failure is one line and its code."""
        from tpx.engine.service import StartupError

        try:
            self.guarded(start)
        except StartupError as exc:
            fail(str(exc), exc.code)
        except OSError as exc:  # anything the engine did not name: not known to be the setup's fault
            fail(f"cannot start: {exc}", exitcodes.UNAVAILABLE)

    @contextlib.contextmanager
    def redis(self) -> Iterator[redis.Redis]:
        """A Redis client that has answered a PING (else exit 3 or 2), closed afterwards."""
        from tpx.connections import redis_client

        client = redis_client(self.settings)
        self.guarded(client.ping)
        try:
            yield client
        finally:
            client.close()


# --- the flags, declared once -----------------------------------------------------------------


#: What each settings flag sets, for --help (config.py holds the longer story of each).
_DESCRIPTIONS: Final[dict[str, str]] = {
    "redis_url": "Redis holding the stream.",
    "database_url": "PostgreSQL holding positions (URL or key=value DSN).",
    "db_schema": "Schema holding positions and tpx's tables.",
    "stream": "Input stream key (dead letters: <stream>:dlq).",
    "group": "Consumer group shared by every instance.",
    "consumer": "This instance's consumer name.",
    "http_addr": "Metrics and health listener, host:port or off.",
    "writers": "Writer threads (one PostgreSQL connection each).",
    "batch_size": "Records per written batch (or see --batch-max-latency-ms).",
    "batch_max_latency_ms": "A batch is written once its oldest record waited this long (ms).",
    "read_count": "Entries per XREADGROUP.",
    "queue_batches": "Batches queued ahead of the writers.",
    "device_cache_size": "Devices kept in the state LRU.",
    "drain_timeout_s": "Seconds allowed to drain on SIGTERM.",
    "migrate_on_start": "Apply migrations before serving.",
    "log_level": "DEBUG, INFO, WARNING or ERROR.",
    "log_format": "json, text, or auto (text on a terminal).",
    "compress_after": "TimescaleDB: compress chunks older than this, e.g. 14d.",
    "retain_for": "TimescaleDB: drop chunks older than this, e.g. 365d.",
}
#: Defaults computed at start-up, spelled for --help.
_COMPUTED_DEFAULTS: Final = {"consumer": "the host name"}


def _env(field: str) -> str:
    """A settings flag's help: what it sets, its env var and its default."""
    default = _COMPUTED_DEFAULTS.get(field, Settings.model_fields[field].default)
    shown = "none" if default == "" else str(default).lower() if isinstance(default, bool) else default
    return f"{_DESCRIPTIONS[field]} [env {env_name(field)}; default: {mask_url(str(shown))}]"


#: Every settings flag a command may take: the :class:`~tpx.config.Settings` field it overrides
#: -> its type and flag (None: not given, the environment or the default applies).
SETTINGS_OPTIONS: Final[dict[str, Any]] = {
    "redis_url": Annotated[str | None, typer.Option("--redis-url", metavar="URL", help=_env("redis_url"))],
    "database_url": Annotated[
        str | None, typer.Option("--database-url", metavar="URL", help=_env("database_url"))
    ],
    "db_schema": Annotated[str | None, typer.Option("--db-schema", metavar="NAME", help=_env("db_schema"))],
    "stream": Annotated[str | None, typer.Option("--stream", metavar="KEY", help=_env("stream"))],
    "group": Annotated[str | None, typer.Option("--group", metavar="NAME", help=_env("group"))],
    "consumer": Annotated[str | None, typer.Option("--consumer", metavar="NAME", help=_env("consumer"))],
    "http_addr": Annotated[str | None, typer.Option("--http-addr", metavar="ADDR", help=_env("http_addr"))],
    "writers": Annotated[int | None, typer.Option(metavar="N", help=_env("writers"))],
    "batch_size": Annotated[int | None, typer.Option(metavar="N", help=_env("batch_size"))],
    "batch_max_latency_ms": Annotated[
        int | None, typer.Option(metavar="MS", help=_env("batch_max_latency_ms"))
    ],
    "read_count": Annotated[int | None, typer.Option(metavar="N", help=_env("read_count"))],
    "queue_batches": Annotated[int | None, typer.Option(metavar="N", help=_env("queue_batches"))],
    "device_cache_size": Annotated[int | None, typer.Option(metavar="N", help=_env("device_cache_size"))],
    "drain_timeout_s": Annotated[float | None, typer.Option(metavar="SECONDS", help=_env("drain_timeout_s"))],
    "migrate_on_start": Annotated[
        bool | None, typer.Option("--migrate/--no-migrate", help=_env("migrate_on_start"))
    ],
    "log_level": Annotated[str | None, typer.Option(metavar="LEVEL", help=_env("log_level"))],
    "log_format": Annotated[str | None, typer.Option(metavar="FORMAT", help=_env("log_format"))],
    "compress_after": Annotated[
        str | None, typer.Option("--compress-after", metavar="DURATION", help=_env("compress_after"))
    ],
    "retain_for": Annotated[
        str | None, typer.Option("--retain-for", metavar="DURATION", help=_env("retain_for"))
    ],
}

#: The input stream's Redis.
REDIS_OPTIONS: Final = ("redis_url", "stream")
#: ... and the consumer group read on it.
GROUP_OPTIONS: Final = (*REDIS_OPTIONS, "group")
#: The database holding positions.
POSTGRES_OPTIONS: Final = ("database_url", "db_schema")
#: What the dead-letter commands take (the dead-letter stream is the input stream's).
DLQ_OPTIONS: Final = REDIS_OPTIONS
#: Every connection setting: what `tpx serve` takes.
CONNECTION_OPTIONS: Final = ("redis_url", *POSTGRES_OPTIONS, "stream", "group", "consumer")

AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Show what would change; change nothing.")]
#: The parameter name ``--json`` arrives under.
_JSON_PARAM: Final = "as_json"


def with_settings(*fields: str, json: bool = False) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the settings flags ``fields`` (keys of :data:`SETTINGS_OPTIONS`) and, with
    ``json``, ``--json``. The function's first parameter receives the :class:`Invocation`; its
    other parameters stay its own flags and arguments, listed first in ``--help``."""
    unknown = [f for f in fields if f not in SETTINGS_OPTIONS]
    if unknown:
        raise TypeError(f"not settings flags: {', '.join(unknown)}")

    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in list(inspect.signature(fn).parameters.values())[1:]  # the first: the Invocation
        ]
        added = [
            inspect.Parameter(f, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=SETTINGS_OPTIONS[f])
            for f in fields
        ]
        if json:
            added.append(
                inspect.Parameter(
                    _JSON_PARAM, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=AsJson
                )
            )
        clash = {p.name for p in own} & {p.name for p in added}
        if clash:
            raise TypeError(f"{fn.__name__} declares shared flags itself: {', '.join(sorted(clash))}")

        def command(**given: Any) -> None:
            overrides = {f: given.pop(f) for f in fields}
            as_json = bool(given.pop(_JSON_PARAM, False))
            token = _ERRORS_AS_JSON.set(as_json)
            fields_token = _COMMAND_FIELDS.set(fields)
            try:
                fn(Invocation(overrides, as_json), **given)
            finally:
                _COMMAND_FIELDS.reset(fields_token)
                _ERRORS_AS_JSON.reset(token)

        command.__name__ = fn.__name__
        command.__qualname__ = fn.__qualname__
        command.__doc__ = fn.__doc__
        command.__module__ = fn.__module__
        parameters = [*own, *added]
        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        return command

    return decorate
