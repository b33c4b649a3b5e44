"""The operator's commands: status, pending, claim, dlq …, rehydrate, device.

Each one computes a result with a function of :mod:`tpx.ops` and renders it
as a table, or as JSON with ``--json``. State-changing commands take
``--dry-run``; long ones show a progress bar on stderr.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import redis
import typer
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tpx import exitcodes
from tpx.cliutil import (
    AsJson,
    DatabaseUrl,
    DryRun,
    Group,
    RedisUrl,
    Schema,
    Stream,
    fail,
    guarded,
    settings_from,
)
from tpx.config import Settings, parse_duration
from tpx.connections import redis_client
from tpx.ops import claim as claim_ops
from tpx.ops import control, dlq, inspect, render

dlq_app = typer.Typer(help="Inspect, replay, export and purge dead letters.", no_args_is_help=True)

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

StageOpt = Annotated[str | None, typer.Option("--stage", help="Only this stage: decode or write.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="Only this device_id.")]
MaxReplays = Annotated[
    int | None, typer.Option("--max-replays", min=0, help="Refuse entries already replayed this many times.")
]


def emit(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


@contextmanager
def connected(**overrides: Any) -> Iterator[tuple[redis.Redis, Settings]]:
    settings = settings_from(**overrides)
    client = redis_client(settings)
    guarded(client.ping, settings)
    try:
        yield client, settings
    finally:
        client.close()


@contextmanager
def progress_bar(label: str, total: int | None) -> Iterator[Any]:
    bar = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not sys.stderr.isatty(),
    )
    with bar:
        task = bar.add_task(label, total=total)
        yield lambda n=1: bar.advance(task, n)


# --- status and pending -----------------------------------------------------------------


def status(
    redis_url: RedisUrl = None,
    stream: Stream = None,
    group: Group = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes with --watch.")] = 2.0,
    as_json: AsJson = False,
) -> None:
    """Is it keeping up? Stream, group lag, pending per consumer (alive or dead), DLQ, instances.

    Example: tpx status --watch
    """
    with connected(redis_url=redis_url, stream=stream, group=group) as (client, s):
        if not watch:
            st = guarded(lambda: inspect.status(client, s), s)
            if as_json:
                emit(st.to_dict())
            else:
                render.print_status(console, st)
            return
        with Live(console=console, auto_refresh=False) as live:
            try:
                while True:
                    st = guarded(lambda: inspect.status(client, s), s)
                    if as_json:
                        typer.echo(json.dumps(st.to_dict(), default=str))
                    else:
                        from rich.console import Group as RichGroup

                        live.update(RichGroup(*render.status_renderables(st)), refresh=True)
                    time.sleep(interval)
            except KeyboardInterrupt:
                pass


def pending(
    consumer: Annotated[str | None, typer.Option("--consumer", help="Only this consumer.")] = None,
    min_idle: Annotated[int | None, typer.Option("--min-idle", min=0, help="Only entries idle ≥ MS.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, oldest first.")] = 100,
    redis_url: RedisUrl = None,
    stream: Stream = None,
    group: Group = None,
    as_json: AsJson = False,
) -> None:
    """What is stuck? Pending entries with idle time and delivery count, oldest first.

    Example: tpx pending --consumer tpx-7f9c --min-idle 60000
    """
    with connected(redis_url=redis_url, stream=stream, group=group) as (client, s):
        rows = guarded(lambda: inspect.pending(client, s, consumer, min_idle, limit), s)
    if as_json:
        emit([asdict(r) for r in rows])
    else:
        render.print_pending(console, rows)


# --- claim ------------------------------------------------------------------------------------


def claim(
    dead_consumer: Annotated[str, typer.Option("--dead-consumer", help="The consumer to take over.")],
    min_idle: Annotated[int, typer.Option("--min-idle", min=0, help="Only entries idle ≥ MS.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Even if the consumer still heartbeats.")] = False,
    dry_run: DryRun = False,
    redis_url: RedisUrl = None,
    database_url: DatabaseUrl = None,
    db_schema: Schema = None,
    stream: Stream = None,
    group: Group = None,
    as_json: AsJson = False,
) -> None:
    """Take over a dead instance's pending entries: write them (or dead-letter them), then
    remove the consumer from the group.

    Example: tpx claim --dead-consumer tpx-7f9c --dry-run
    """
    with (
        connected(
            redis_url=redis_url, database_url=database_url, db_schema=db_schema, stream=stream, group=group
        ) as (client, s),
        progress_bar("claiming", None) as advance,
    ):
        done = {"n": 0}

        def report_progress(claimed: int, total: int) -> None:
            advance(claimed - done["n"])
            done["n"] = claimed

        result = guarded(
            lambda: claim_ops.claim_dead_consumer(
                client, s, dead_consumer, min_idle, dry_run, force, report_progress
            ),
            s,
        )
    if as_json:
        emit(result.to_dict())
    else:
        render.print_claim(console, result)


# --- dead letters ---------------------------------------------------------------------------


@dlq_app.command("list")
def dlq_list(
    stage: StageOpt = None,
    device: DeviceOpt = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 50,
    redis_url: RedisUrl = None,
    stream: Stream = None,
    as_json: AsJson = False,
) -> None:
    """What was rejected, and why? The newest dead letters.

    Example: tpx dlq list --stage decode --limit 20
    """
    with connected(redis_url=redis_url, stream=stream) as (client, s):
        letters = guarded(lambda: dlq.list_letters(client, s, stage, device, limit), s)
    if as_json:
        emit([letter.to_dict() for letter in letters])
    else:
        render.print_letters(console, letters)


@dlq_app.command("show")
def dlq_show(
    entry_id: Annotated[str, typer.Argument(metavar="ID", help="The dead letter's id.")],
    redis_url: RedisUrl = None,
    stream: Stream = None,
    as_json: AsJson = False,
) -> None:
    """One dead letter with its full original payload.

    Example: tpx dlq show 1732800000000-0
    """
    with connected(redis_url=redis_url, stream=stream) as (client, s):
        letter = guarded(lambda: dlq.show(client, s, entry_id), s)
    if as_json:
        emit(letter.to_dict())
    else:
        render.print_letter(console, letter)


def _select_ids(client: redis.Redis, s: Settings, stage: str | None, device: str | None) -> list[str]:
    return [letter.id for letter in dlq.iter_letters(client, s, stage, device)]


@dlq_app.command("replay")
def dlq_replay(
    ids: Annotated[list[str] | None, typer.Argument(metavar="[ID]...", help="Dead letter ids.")] = None,
    replay_all: Annotated[
        bool, typer.Option("--all", help="Every dead letter matching the filters.")
    ] = False,
    stage: StageOpt = None,
    device: DeviceOpt = None,
    max_replays: MaxReplays = None,
    dry_run: DryRun = False,
    redis_url: RedisUrl = None,
    stream: Stream = None,
    as_json: AsJson = False,
) -> None:
    """Put dead letters back on the input stream (replays + 1), each moved atomically.

    Example: tpx dlq replay --all --stage write --max-replays 3
    """
    if bool(ids) == replay_all:
        fail("give dead letter ids, or --all (with --stage/--device filters), not both", exitcodes.USAGE)
    if ids and (stage or device):
        fail("--stage and --device filter --all; they do not apply to explicit ids", exitcodes.USAGE)
    _replay(ids or [], replay_all, stage, device, max_replays, dry_run, redis_url, stream, as_json)


def _replay(
    ids: list[str],
    replay_all: bool,
    stage: str | None,
    device: str | None,
    max_replays: int | None,
    dry_run: bool,
    redis_url: str | None,
    stream: str | None,
    as_json: bool,
) -> None:
    with connected(redis_url=redis_url, stream=stream) as (client, s):
        guarded(lambda: [dlq.check_id(entry_id) for entry_id in ids], s)
        chosen = guarded(lambda: _select_ids(client, s, stage, device), s) if replay_all else ids
        with progress_bar("replaying", len(chosen)) as advance:
            results = guarded(lambda: dlq.replay(client, s, chosen, max_replays, dry_run, advance), s)
    if as_json:
        emit([asdict(r) for r in results])
    else:
        render.print_replays(console, results)
    if any(r.outcome == "missing" for r in results) and not replay_all:
        raise typer.Exit(exitcodes.ERROR)


@dlq_app.command("drain")
def dlq_drain(
    stage: StageOpt = None,
    device: DeviceOpt = None,
    max_replays: MaxReplays = None,
    dry_run: DryRun = False,
    redis_url: RedisUrl = None,
    stream: Stream = None,
    as_json: AsJson = False,
) -> None:
    """Replay every matching dead letter; with --dry-run, a histogram of why they failed.

    Example: tpx dlq drain --dry-run
    """
    if not dry_run:
        _replay([], True, stage, device, max_replays, False, redis_url, stream, as_json)
        return
    with connected(redis_url=redis_url, stream=stream) as (client, s):
        letters = guarded(lambda: list(dlq.iter_letters(client, s, stage, device)), s)
    rows = dlq.histogram(letters)
    if as_json:
        emit([{"stage": st, "reason": why, "count": n} for st, why, n in rows])
    else:
        render.print_histogram(console, rows)


@dlq_app.command("export")
def dlq_export(
    file: Annotated[Path, typer.Argument(help="Where to write JSON lines ('-' for stdout).")],
    stage: StageOpt = None,
    device: DeviceOpt = None,
    redis_url: RedisUrl = None,
    stream: Stream = None,
) -> None:
    """Write dead letters as JSON lines (id, dlq fields, original fields).

    Example: tpx dlq export /tmp/dlq-$(date +%F).jsonl --stage decode
    """
    with connected(redis_url=redis_url, stream=stream) as (client, s):
        total = int(client.xlen(s.dlq_stream))
        with progress_bar("exporting", total) as advance:
            if str(file) == "-":
                count = guarded(lambda: dlq.export(client, s, sys.stdout, stage, device, advance), s)
            else:
                try:
                    count = guarded(
                        lambda: dlq.export_file(
                            client, s, file, stage=stage, device=device, progress=advance
                        ),
                        s,
                    )
                except OSError as exc:
                    fail(f"cannot write {file}: {exc.strerror}", exitcodes.ERROR)
    if str(file) != "-":
        err_console.print(f"exported {count:,} dead letters to {file}")


@dlq_app.command("purge")
def dlq_purge(
    older_than: Annotated[str, typer.Option("--older-than", help="e.g. 7d, 12h, 90m.")],
    dry_run: DryRun = False,
    redis_url: RedisUrl = None,
    stream: Stream = None,
    as_json: AsJson = False,
) -> None:
    """Delete dead letters older than a duration (by when they were dead-lettered).

    Example: tpx dlq purge --older-than 30d --dry-run
    """
    seconds: float = guarded(lambda: parse_duration(older_than))
    with connected(redis_url=redis_url, stream=stream) as (client, s):
        result = guarded(lambda: dlq.purge(client, s, seconds, dry_run), s)
    if as_json:
        emit(asdict(result))
    else:
        render.print_purge(console, result)


# --- devices ------------------------------------------------------------------------------------


def rehydrate(
    device: Annotated[str, typer.Argument(help="The device_id.")],
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the instances.")] = 3.0,
    redis_url: RedisUrl = None,
    stream: Stream = None,
    as_json: AsJson = False,
) -> None:
    """Make every running instance drop a device's cached state and reseed it from Postgres.

    Example: tpx rehydrate 356307042441013
    """
    with connected(redis_url=redis_url, stream=stream) as (client, s):
        result = guarded(lambda: control.rehydrate(client, s, device, timeout), s)
    if as_json:
        emit(
            {
                "op": result.op,
                "device": result.device,
                "confirmed": result.confirmed,
                "silent": result.silent,
                "replies": result.replies,
            }
        )
    else:
        render.print_control(console, result)
    if result.silent:
        raise typer.Exit(exitcodes.ERROR)


def device(
    device_id: Annotated[str, typer.Argument(metavar="DEVICE", help="The device_id.")],
    limit: Annotated[int, typer.Option(min=1, help="Newest rows to show.")] = 10,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the instances.")] = 2.0,
    redis_url: RedisUrl = None,
    database_url: DatabaseUrl = None,
    db_schema: Schema = None,
    stream: Stream = None,
    as_json: AsJson = False,
) -> None:
    """A device's cached state in the running instances, and its newest rows in positions.

    Example: tpx device 356307042441013 --limit 5
    """
    with connected(redis_url=redis_url, database_url=database_url, db_schema=db_schema, stream=stream) as (
        client,
        s,
    ):
        report = guarded(lambda: control.device(client, s, device_id, limit, timeout), s)
    if as_json:
        emit(report.to_dict())
    else:
        render.print_device(console, report)


# --- load -------------------------------------------------------------------------------------------


def simulate(
    devices: Annotated[int, typer.Option(min=1, help="Devices in the fleet.")] = 100,
    rate: Annotated[
        float | None, typer.Option(min=0.1, help="Records per second (default: as fast as possible).")
    ] = None,
    duration: Annotated[float | None, typer.Option(min=0.1, help="Stop after this many seconds.")] = None,
    count: Annotated[int | None, typer.Option(min=1, help="Stop after this many records.")] = None,
    duplicates: Annotated[float, typer.Option(min=0, max=1, help="Fraction of records sent again.")] = 0.0,
    late: Annotated[float, typer.Option(min=0, max=1, help="Fraction of out-of-order (late) records.")] = 0.0,
    poison: Annotated[
        float, typer.Option(min=0, max=1, help="Fraction of poison records (all kinds).")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Same seed, same records.")] = 1,
    start_ms: Annotated[
        int | None, typer.Option(help="First fix time, epoch ms (default: now - 1 day).")
    ] = None,
    redis_url: RedisUrl = None,
    stream: Stream = None,
    as_json: AsJson = False,
) -> None:
    """Publish a synthetic fleet's records to the stream: the load source for demos and tests.

    Example: tpx simulate --devices 1000 --rate 5000 --duration 60 --poison 0.01 --seed 7
    """
    from tpx.fleet import Fleet
    from tpx.simulate import simulate as run

    if duration is None and count is None:
        fail("give --duration or --count (Ctrl-C also stops it)", exitcodes.USAGE)
    first = start_ms if start_ms is not None else int(time.time() * 1000) - 86_400_000
    fleet = Fleet(
        devices=devices,
        seed=seed,
        start_ms=first,
        duplicate_fraction=duplicates,
        late_fraction=late,
        poison_fraction=poison,
    )
    stop = threading.Event()
    with connected(redis_url=redis_url, stream=stream) as (client, s):

        def show(produced: int, per_s: float) -> None:
            if sys.stderr.isatty():
                err_console.print(f"\r{produced:,} records  {per_s:,.0f}/s", end="")

        try:
            report = guarded(lambda: run(client, s.stream, fleet, rate, count, duration, stop, show), s)
        except KeyboardInterrupt:
            stop.set()
            raise typer.Exit(exitcodes.OK) from None
    if sys.stderr.isatty():
        err_console.print()
    if as_json:
        emit(report.to_dict())
    else:
        console.print(
            f"published {report.produced:,} records to {s.stream} in {report.seconds:.1f}s "
            f"({report.rate:,.0f}/s): {report.duplicates:,} duplicates, {report.late:,} late, "
            f"{report.poison:,} poison"
        )


def register(app: typer.Typer) -> None:
    app.command()(simulate)
    app.command()(status)
    app.command()(pending)
    app.command()(claim)
    app.add_typer(dlq_app, name="dlq")
    app.command()(rehydrate)
    app.command()(device)
