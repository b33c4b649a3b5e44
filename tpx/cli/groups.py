"""`tpx groups`, `tpx group reset / prune`: the consumer group, as kafka-consumer-groups manages it."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated

import typer

from tpx import exitcodes
from tpx.cli.options import GROUP_OPTIONS, DryRun, Invocation, fail, with_settings

if TYPE_CHECKING:
    from tpx.ops.groups import Target

app = typer.Typer(
    help="Move a consumer group's position, remove its stale consumers.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@with_settings("redis_url", json=True)
def groups(
    cmd: Invocation,
    match: Annotated[
        str, typer.Option("--match", metavar="PATTERN", help="Only stream keys matching this glob.")
    ] = "*",
) -> None:
    """Which streams and consumer groups are on this Redis? Length, groups, pending, lag.

    Example: tpx groups --match 'telemetry:*'
    """
    from tpx.cli import render
    from tpx.ops.groups import list_groups

    with cmd.redis() as client:
        listing = cmd.guarded(lambda: list_groups(client, match))
    cmd.answer(asdict(listing), lambda: render.print_groups(listing))


def parse_time(text: str) -> dt.datetime:
    """An ISO 8601 time (``2026-12-01T09:30``, ``…Z``, ``…+01:00``); without an offset: UTC."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use ISO 8601, e.g. 2026-12-01T09:30:00Z)") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


@app.command("reset")
@with_settings(*GROUP_OPTIONS, json=True)
def reset(
    cmd: Invocation,
    to_datetime: Annotated[
        str | None, typer.Option("--to-datetime", metavar="TIME", help="Re-read from this time (UTC).")
    ] = None,
    to_earliest: Annotated[bool, typer.Option("--to-earliest", help="Re-read the whole stream.")] = False,
    to_latest: Annotated[bool, typer.Option("--to-latest", help="Skip everything not yet read.")] = False,
    dry_run: DryRun = False,
) -> None:
    """Move the group's position (XGROUP SETID); pending entries stay pending. Writes are
    idempotent, so re-reading after a bad deploy stores nothing twice.

    Example: tpx group reset --to-datetime 2026-12-01T09:30:00Z --dry-run
    """
    from tpx.cli import render
    from tpx.ops import groups as ops

    if sum((to_datetime is not None, to_earliest, to_latest)) != 1:
        fail("give one of --to-datetime TIME, --to-earliest, --to-latest", exitcodes.USAGE)
    target: Target = "earliest" if to_earliest else "latest"
    if to_datetime is not None:
        target = cmd.guarded(lambda: parse_time(to_datetime))
    with cmd.redis() as client:
        result = cmd.guarded(lambda: ops.reset(client, cmd.settings, target, dry_run))
    cmd.answer(asdict(result), lambda: render.print_reset(result))


@app.command("prune")
@with_settings(*GROUP_OPTIONS, json=True)
def prune(cmd: Invocation, dry_run: DryRun = False) -> None:
    """Remove every consumer with no heartbeat and no pending entries (restarted pods' names).

    Example: tpx group prune --dry-run
    """
    from tpx.cli import render
    from tpx.ops import groups as ops

    with cmd.redis() as client:
        result = cmd.guarded(lambda: ops.prune(client, cmd.settings, dry_run))
    cmd.answer(asdict(result), lambda: render.print_prune(result))
