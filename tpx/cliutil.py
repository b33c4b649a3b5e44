"""What every `tpx` command shares: one-line failures, exit codes, settings, common options."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, TypeVar

import psycopg
import redis
import typer

from tpx import exitcodes
from tpx.config import ConfigError, Settings, env_name, load, mask_url
from tpx.errors import first_line
from tpx.ops.inspect import OpsError

log = logging.getLogger("tpx")
T = TypeVar("T")


def fail(message: str, code: int = exitcodes.ERROR) -> NoReturn:
    typer.echo(f"tpx: {message}", err=True)
    raise typer.Exit(code)


def guarded(fn: Callable[[], T], settings: Settings | None = None) -> T:
    """Run ``fn``; turn the failures a user can hit into one line and an exit code."""
    try:
        return fn()
    except ConfigError as exc:
        for line in exc.lines:
            typer.echo(f"tpx: invalid setting {line}", err=True)
        raise typer.Exit(exitcodes.USAGE) from None
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
        first = first_line(exc)
        fail(f"PostgreSQL error: {mask_url(first)}", exitcodes.ERROR)


def settings_from(**overrides: Any) -> Settings:
    return guarded(lambda: load(**overrides))


# --- shared options -----------------------------------------------------------

RedisUrl = Annotated[str | None, typer.Option("--redis-url", help=f"[env {env_name('redis_url')}]")]
DatabaseUrl = Annotated[str | None, typer.Option("--database-url", help=f"[env {env_name('database_url')}]")]
Schema = Annotated[str | None, typer.Option("--db-schema", help=f"[env {env_name('db_schema')}]")]
Stream = Annotated[str | None, typer.Option("--stream", help=f"[env {env_name('stream')}]")]
Group = Annotated[str | None, typer.Option("--group", help=f"[env {env_name('group')}]")]
Consumer = Annotated[str | None, typer.Option("--consumer", help=f"[env {env_name('consumer')}]")]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Show what would change; change nothing.")]
