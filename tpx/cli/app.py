"""The `tpx` command line: a thin shell over functions that return data.

Every command turns failures into one line on stderr and a named exit code
(:mod:`tpx.exitcodes`); a traceback is never the user interface. The commands live by kind:
:mod:`tpx.cli.serve` (serve, domain, migrate, config), :mod:`tpx.cli.ops` (status, pending, claim,
rehydrate, device, top), :mod:`tpx.cli.dlq`,
:mod:`tpx.cli.groups` (groups, group reset/prune), :mod:`tpx.cli.demo` (demo, simulate),
:mod:`tpx.cli.timing` (geofences, timing show/recompute); their shared
flags and error handling in :mod:`tpx.cli.options`, their tables in :mod:`tpx.cli.render`.
"""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperCommand

from tpx import __version__
from tpx.cli import demo, dlq, groups, ops, serve, timing
from tpx.cli.placeholders import TpxCommand

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


# the order `tpx --help` lists them in
app.command()(serve.serve)
app.command()(serve.domain)
app.command()(serve.migrate)
app.command()(serve.config)
app.command()(ops.top)
app.command()(demo.demo)
app.command()(demo.simulate)
app.command()(ops.status)
app.command()(ops.pending)
app.command()(ops.claim)
app.add_typer(dlq.app, name="dlq")
app.command()(groups.groups)
app.add_typer(groups.app, name="group")
app.command()(ops.rehydrate)
app.command()(ops.device)
app.command()(timing.geofences)
app.add_typer(timing.app, name="timing")


def _summary(doc: str | None) -> str | None:
    """A docstring's first paragraph on one line: click would cut it at 45 characters."""
    return " ".join((doc or "").strip().split("\n\n", 1)[0].split()) or None


def _polish_help(typer_app: typer.Typer) -> None:
    """Give each command its whole summary in the parent's --help (click cuts it with '...'), and
    its placeholders tpx's spelling (:class:`~tpx.cli.placeholders.TpxCommand`: ``DEVICE``, not
    ``{DEVICE}``)."""
    for info in typer_app.registered_commands:
        if info.short_help is None and info.callback is not None:
            info.short_help = _summary(info.callback.__doc__)
        if info.cls in (None, TyperCommand):  # typer's default: no command asked for its own class
            info.cls = TpxCommand
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _polish_help(group.typer_instance)


_polish_help(app)


def main() -> None:
    app()
