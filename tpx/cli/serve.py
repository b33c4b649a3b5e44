"""`tpx serve`, `tpx domain`, `tpx migrate`, `tpx config`: run the engine and its domain worker,
prepare the schema, show the settings."""

from __future__ import annotations

import sys

import typer

from tpx import exitcodes
from tpx.cli.options import (
    CONNECTION_OPTIONS,
    POSTGRES_OPTIONS,
    DryRun,
    Invocation,
    emit,
    log,
    with_settings,
)
from tpx.config import env_name

#: The engine's tuning flags, after the connection ones (every one is also a `TPX_*` variable).
ENGINE_OPTIONS = (
    "http_addr",
    "writers",
    "batch_size",
    "batch_max_latency_ms",
    "read_count",
    "queue_batches",
    "device_cache_size",
    "drain_timeout_s",
    "migrate_on_start",
    "log_level",
    "log_format",
)


@with_settings(*CONNECTION_OPTIONS, *ENGINE_OPTIONS)
def serve(cmd: Invocation) -> None:
    """Run the engine: read the stream, write positions, until SIGTERM/SIGINT.

    Example: TPX_DATABASE_URL=postgresql://tpx@db/fleet tpx serve --writers 2
    """
    import logging
    import os

    from tpx import logs
    from tpx.domainstage.stage import DomainStage
    from tpx.engine.service import Engine
    from tpx.signals import StopSignals

    settings = cmd.settings
    logs.setup(settings.log_level, settings.log_format, settings.consumer)
    if settings.domain == "off" and settings.domain_defer:  # meant to defer: no record comes
        log.warning("TPX_DOMAIN_DEFER=true does nothing with TPX_DOMAIN=off: no fix is queued for tpx domain")
    engine = Engine(settings, tx_stage=DomainStage(settings) if settings.domain != "off" else None)
    StopSignals(engine.request_stop, _forced_exit).install()
    cmd.start(engine.start)
    try:
        code = engine.run()
    except Exception as exc:  # a bug in the main loop: same treatment as a crashed thread
        log.critical("main thread crashed", exc_info=exc)
        path = engine.write_panic_dump("MainThread", exc)
        log.critical("panic dump written to %s; exiting %d", path, exitcodes.CRASH)
        code = exitcodes.CRASH
    if code != exitcodes.OK:
        logging.shutdown()
        os._exit(code)  # threads may be wedged: do not wait for them
    raise typer.Exit(code)


@with_settings(*CONNECTION_OPTIONS, "http_addr", "log_level", "log_format")
def domain(cmd: Invocation) -> None:
    """Write the timing records of the fixes `tpx serve` queued (TPX_DOMAIN_DEFER=true), until SIGTERM.

    Example: TPX_DOMAIN_DEFER=true TPX_HTTP_ADDR=0.0.0.0:9109 tpx domain
    """
    from tpx import logs
    from tpx.domainstage.worker import DomainWorker
    from tpx.signals import StopSignals

    settings = cmd.settings
    logs.setup(settings.log_level, settings.log_format, settings.consumer)
    worker = DomainWorker(settings)
    StopSignals(worker.request_stop, _forced_exit).install()
    cmd.start(worker.start)
    raise typer.Exit(worker.run())


def _forced_exit() -> None:
    """A stop signal after the window: leave now; unacknowledged entries stay pending."""
    import os

    sys.stderr.write("tpx: second signal, exiting at once (unfinished entries stay pending)\n")
    sys.stderr.flush()
    os._exit(exitcodes.FORCED)


@with_settings(*POSTGRES_OPTIONS, "compress_after", "retain_for", json=True)
def migrate(cmd: Invocation, dry_run: DryRun = False) -> None:
    """Apply pending schema migrations and the TimescaleDB policies, then exit (safe to run concurrently).

    Example: tpx migrate --database-url postgresql://postgres@127.0.0.1/fleet --compress-after 14d
    """
    from tpx import logs
    from tpx.schema import migrate_for

    settings = cmd.settings
    if dry_run:
        from tpx.ops.migrations import pending_migrations

        pending = cmd.guarded(lambda: pending_migrations(settings.database_url, settings.db_schema))
        if cmd.as_json:
            emit({"schema": settings.db_schema, "dry_run": True, "would_apply": pending}, indent=None)
            return
        for name in pending:
            typer.echo(f"would apply {name}")
        typer.echo(
            f"schema {settings.db_schema}: {len(pending)} migrations to apply (dry run; the "
            "TimescaleDB policies are checked only when migrating)"
        )
        return
    logs.setup(
        settings.log_level, settings.log_format, settings.consumer, stream=sys.stderr
    )  # stdout: report
    report = cmd.guarded(lambda: migrate_for(settings))
    if cmd.as_json:
        emit(
            {
                "schema": report.schema,
                "applied": report.applied,
                "version": report.current_version,
                "storage": report.storage,
                "storage_reason": report.storage_reason,
                "storage_hint": report.storage_hint,
                "policies": report.policies,
            },
            indent=None,
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


@with_settings(json=True)
def config(cmd: Invocation) -> None:
    """Print the effective configuration (environment + defaults), passwords masked.

    Example: TPX_WRITERS=4 tpx config --json
    """
    data = cmd.settings.masked()
    if cmd.as_json:
        emit(data)
        return
    width = max(len(env_name(k)) for k in data)
    for key, value in data.items():
        typer.echo(f"{env_name(key):<{width}}  {value}")
