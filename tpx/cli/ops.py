"""The operator's commands: status, pending, claim, rehydrate, device, and the dashboard (`top`).

Each one computes a result with a function of :mod:`tpx.ops` and renders it as a table
(:mod:`tpx.cli.render`), or as JSON with ``--json``. State-changing commands take ``--dry-run``;
long ones show a progress bar on stderr. The dead-letter commands are in :mod:`tpx.cli.dlq`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from typing import Annotated

import typer

from tpx import exitcodes
from tpx.cli.options import (
    GROUP_OPTIONS,
    POSTGRES_OPTIONS,
    REDIS_OPTIONS,
    DryRun,
    Invocation,
    emit,
    fail,
    with_settings,
)

#: Seconds `tpx rehydrate` waits for the instances' confirmations by default (the same wait as
#: :data:`tpx.ops.control.REPLY_WAIT_S`, spelled here so `tpx --help` need not load the ops).
REHYDRATE_WAIT_S = 3.0
#: Seconds `tpx device` waits for the instances' cached states: it also reads Postgres, and an
#: instance that is slower than this is named as silent rather than holding the answer.
DEVICE_WAIT_S = 2.0


@with_settings(*GROUP_OPTIONS, json=True)
def status(
    cmd: Invocation,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[
        float, typer.Option(min=0.2, metavar="SECONDS", help="Seconds between refreshes with --watch.")
    ] = 2.0,
) -> None:
    """Is it keeping up? Stream, group lag, pending per consumer (alive or dead), DLQ, instances.

    Example: tpx status --watch
    """
    from tpx.cli import render
    from tpx.ops import inspect

    with cmd.redis() as client:
        if not watch:
            st = cmd.guarded(lambda: inspect.status(client, cmd.settings))
            cmd.answer(st.to_dict(), lambda: render.print_status(st))
            return
        with render.live_status() as show:
            try:
                while True:
                    st = cmd.guarded(lambda: inspect.status(client, cmd.settings))
                    if cmd.as_json:
                        emit(st.to_dict(), indent=None)
                    else:
                        show(st)
                    time.sleep(interval)
            except KeyboardInterrupt:
                pass


@with_settings(*GROUP_OPTIONS, json=True)
def pending(
    cmd: Invocation,
    consumer: Annotated[
        str | None, typer.Option("--consumer", metavar="NAME", help="Only this consumer.")
    ] = None,
    min_idle: Annotated[
        int | None, typer.Option("--min-idle", min=0, metavar="MS", help="Only entries idle ≥ MS.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, metavar="N", help="At most this many, oldest first.")] = 100,
) -> None:
    """What is stuck? Pending entries with idle time and delivery count, oldest first.

    Example: tpx pending --consumer tpx-7f9c --min-idle 60000
    """
    from tpx.cli import render
    from tpx.ops import inspect

    with cmd.redis() as client:
        rows = cmd.guarded(lambda: inspect.pending(client, cmd.settings, consumer, min_idle, limit))
    cmd.answer([asdict(r) for r in rows], lambda: render.print_pending(rows))


@with_settings("redis_url", *POSTGRES_OPTIONS, "stream", "group", json=True)
def claim(
    cmd: Invocation,
    dead_consumer: Annotated[
        str, typer.Option("--dead-consumer", metavar="NAME", help="The consumer to take over.")
    ],
    min_idle: Annotated[
        int, typer.Option("--min-idle", min=0, metavar="MS", help="Only entries idle ≥ MS.")
    ] = 0,
    force: Annotated[bool, typer.Option("--force", help="Even if the consumer still heartbeats.")] = False,
    dry_run: DryRun = False,
) -> None:
    """Take over a dead instance's pending entries: write them (or dead-letter them), then
    remove the consumer from the group.

    Example: tpx claim --dead-consumer tpx-7f9c --dry-run
    """
    from tpx.cli import render
    from tpx.ops.claim import claim_dead_consumer

    with cmd.redis() as client, render.progress_bar("claiming", None) as advance:
        done = 0

        def report_progress(claimed: int, total: int) -> None:
            nonlocal done
            advance(claimed - done)
            done = claimed

        result = cmd.guarded(
            lambda: claim_dead_consumer(
                client, cmd.settings, dead_consumer, min_idle, dry_run, force, report_progress
            )
        )
    cmd.answer(result.to_dict(), lambda: render.print_claim(result))


@with_settings(*REDIS_OPTIONS, json=True)
def rehydrate(
    cmd: Invocation,
    device: Annotated[str, typer.Argument(metavar="DEVICE", help="The device_id.")],
    timeout: Annotated[
        float, typer.Option(min=0.1, metavar="SECONDS", help="Seconds to wait for the instances.")
    ] = REHYDRATE_WAIT_S,
    dry_run: DryRun = False,
) -> None:
    """Make every running instance drop a device's cached state and reseed it from Postgres.

    Example: tpx rehydrate 356307042441013
    """
    from tpx.cli import render
    from tpx.ops import control

    with cmd.redis() as client:
        if dry_run:
            asked = cmd.guarded(lambda: control.rehydrate_plan(client, cmd.settings, device))
            cmd.answer(
                {"device": device, "dry_run": True, "would_ask": asked},
                lambda: render.print_rehydrate_plan(device, asked),
            )
            return
        result = cmd.guarded(lambda: control.rehydrate(client, cmd.settings, device, timeout))
    cmd.answer(result.to_dict(), lambda: render.print_control(result))
    if result.silent:
        raise typer.Exit(exitcodes.ERROR)


@with_settings("redis_url", *POSTGRES_OPTIONS, "stream", json=True)
def device(
    cmd: Invocation,
    device_id: Annotated[str, typer.Argument(metavar="DEVICE", help="The device_id.")],
    limit: Annotated[int, typer.Option(min=1, metavar="N", help="Newest rows to show.")] = 10,
    timeout: Annotated[
        float, typer.Option(min=0.1, metavar="SECONDS", help="Seconds to wait for the instances.")
    ] = DEVICE_WAIT_S,
) -> None:
    """A device's cached state in the running instances, and its newest rows in positions.

    Example: tpx device 356307042441013 --limit 5
    """
    from tpx.cli import render
    from tpx.ops import control

    with cmd.redis() as client:
        report = cmd.guarded(lambda: control.device(client, cmd.settings, device_id, limit, timeout))
    cmd.answer(report.to_dict(), lambda: render.print_device(report))


@with_settings("redis_url", *POSTGRES_OPTIONS, "stream", "group")
def top(
    cmd: Invocation,
    interval: Annotated[
        float, typer.Option(min=0.2, metavar="SECONDS", help="Seconds between refreshes.")
    ] = 1.0,
) -> None:
    """The live dashboard: stream, lag, instances, pending, dead letters, devices; fixes one key away.

    Example: tpx top --interval 2
    """
    if not (sys.stdin.isatty() and sys.stdout.isatty()):  # a pipe, a file, CI, `docker exec` without -t
        fail("tpx top needs a terminal; without one use `tpx status --watch` (or --json)", exitcodes.USAGE)
    from tpx.tui.app import TopApp

    TopApp(cmd.settings, interval=interval).run()
