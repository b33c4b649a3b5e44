"""`tpx geofences`, `tpx timing [show] DEVICE`, `tpx timing recompute`: the domain's commands.

They read the CMS's tables (``TPX_GEOFENCES_TABLE``, ``TPX_TIMING_TABLE``) through
:mod:`tpx.ops.geofences`, :mod:`tpx.ops.timing` and :mod:`tpx.ops.recompute`; a missing table or
column is one line naming it and exit 2, as for ``tpx serve`` with ``TPX_DOMAIN=on``.

``tpx timing`` is a group whose default command is ``show``: ``tpx timing DEVICE`` is
``tpx timing show DEVICE`` (a device named like a command is ``tpx timing show NAME``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from typer.core import TyperGroup

from tpx import exitcodes
from tpx.cli.groups import parse_time
from tpx.cli.options import POSTGRES_OPTIONS, DryRun, Invocation, fail, with_settings
from tpx.config import parse_duration

T = TypeVar("T")

#: What a time flag takes, for --help and the error line.
TIME_FORMS = "a duration back from now (90m, 2h, 7d) or a time (2026-12-01T09:30:00Z; UTC if no offset)"
#: The command `tpx timing ARGS` runs when ARGS does not start with a command's name.
DEFAULT_COMMAND = "show"


class _ShowByDefault(TyperGroup):
    """A group that runs :data:`DEFAULT_COMMAND` when the first argument names no command."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_ShowByDefault,
    help="A device's timing records and membership; recompute a window.\n\n"
    "tpx timing DEVICE is short for tpx timing show DEVICE.",
    no_args_is_help=True,
    subcommand_metavar="COMMAND [ARGS]...",
    rich_markup_mode=None,
)


def parse_when(text: str, flag: str, now: dt.datetime) -> dt.datetime:
    """``2h`` (that long before ``now``) or an ISO 8601 time; ValueError naming ``flag``."""
    try:
        return now - dt.timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        return parse_time(text)
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give {TIME_FORMS}") from None


Since = Annotated[str | None, typer.Option("--since", metavar="TIME", help=f"From TIME: {TIME_FORMS}.")]


def _cms(cmd: Invocation, fn: Callable[[], T]) -> T:
    """Run an ops call; the CMS's tables or tpx's schema missing: one line, exit 2."""
    from tpx.domainstage.tables import TablesMissing
    from tpx.schema import SchemaBehind

    try:
        return cmd.guarded(fn)
    except TablesMissing as exc:
        _usage(str(exc))
    except SchemaBehind as exc:
        _usage(str(exc))


def _usage(message: str) -> NoReturn:
    fail(message, exitcodes.USAGE)


@with_settings("redis_url", *POSTGRES_OPTIONS, "stream", json=True)
def geofences(
    cmd: Invocation,
    reload: Annotated[
        bool,
        typer.Option(
            "--reload", help="First ask the running instances to reload their geofences now (via Redis)."
        ),
    ] = False,
) -> None:
    """Which geofences does tpx use? Each one's id, name, kind, active, and loaded or invalid (why).

    Example: TPX_GEOFENCES_TABLE=cms.geofences tpx geofences --json
    """
    from tpx.cli import render
    from tpx.ops import control
    from tpx.ops.geofences import list_geofences

    if not reload:
        rows = _cms(cmd, lambda: list_geofences(cmd.settings))
        cmd.answer(
            [asdict(r) for r in rows], lambda: render.print_geofences(rows, cmd.settings.geofences_table)
        )
        return
    with cmd.redis() as client:
        result = cmd.guarded(lambda: control.ask(client, cmd.settings, "reload"))
    rows = _cms(cmd, lambda: list_geofences(cmd.settings))

    def show() -> None:
        render.print_reload(result)
        render.print_geofences(rows, cmd.settings.geofences_table)

    cmd.answer({"reload": result.to_dict(), "geofences": [asdict(r) for r in rows]}, show)
    if result.silent:
        raise typer.Exit(exitcodes.ERROR)


@app.command("show")
@with_settings(*POSTGRES_OPTIONS, json=True)
def show(
    cmd: Invocation,
    device: Annotated[str, typer.Argument(metavar="DEVICE", help="The device_id.")],
    since: Since = None,
    limit: Annotated[
        int, typer.Option(min=1, metavar="N", help="At most this many records, newest first.")
    ] = 50,
) -> None:
    """A device's timing records, newest first, and the geofences it is inside now.

    Membership, version and last fix are the device's stored domain state (what the next
    writer resumes from). Also: tpx timing DEVICE.

    Example: tpx timing 356307042441013 --since 2h
    """
    from tpx.cli import render
    from tpx.ops.timing import device_timing

    start = None if since is None else cmd.guarded(lambda: parse_when(since, "--since", _now()))
    report = _cms(cmd, lambda: device_timing(cmd.settings, device, start, limit))
    cmd.answer(report.to_dict(), lambda: render.print_device_timing(report, start))


@app.command("recompute")
@with_settings(*POSTGRES_OPTIONS, json=True)
def recompute(
    cmd: Invocation,
    geofence: Annotated[
        str | None,
        typer.Option("--geofence", metavar="GEOFENCE", help="Every device, for this geofence (its id)."),
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", metavar="DEVICE", help="This device, for every geofence in use.")
    ] = None,
    since: Since = None,
    until: Annotated[
        str | None, typer.Option("--until", metavar="TIME", help="Up to TIME (default: the newest fix).")
    ] = None,
    dry_run: DryRun = False,
) -> None:
    """Replay positions for a window and replace the timing records in it; idempotent.

    For past events after a geofence was edited or added (the running stage adopts it at each
    device's newest fix, without events). --geofence: every device with positions in the
    window, that geofence's records; --device: that device, the records of every geofence in
    use. Each device in one transaction under the stage's lock; rows tpx did not write stay.
    After an edit, wait until the instances reloaded it (TPX_GEOFENCES_RELOAD_S): until then
    they write new fixes' records with the old geometry.

    Example: tpx timing recompute --geofence 12 --since 2026-12-01T06:00:00Z --dry-run
    """
    from tpx.cli import render
    from tpx.ops import recompute as ops

    if geofence is None and device is None:
        _usage("give --geofence ID (every device) or --device D (every geofence)")
    if geofence is not None and device is not None:
        _usage("give --geofence ID or --device D, not both")
    if since is None:
        _usage(f"give --since T, where the window starts: {TIME_FORMS}")
    now = _now()
    start = cmd.guarded(lambda: parse_when(since, "--since", now))
    end = None if until is None else cmd.guarded(lambda: parse_when(until, "--until", now))
    if end is not None and end < start:
        _usage(f"--until {until} is before --since {since}")
    window = ops.Window(start, end)
    try:
        chosen = _cms(cmd, lambda: ops.plan(cmd.settings, window, geofence=geofence, device=device))
    except ops.TargetError as exc:
        _usage(str(exc))
    with render.progress_bar("recomputing", len(chosen.devices)) as advance:
        result = _cms(cmd, lambda: ops.run(cmd.settings, chosen, dry_run=dry_run, progress=advance))
    cmd.answer(result.to_dict(), lambda: render.print_recompute(result))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
