"""How `tpx <command> --help` spells the values a command takes: one upper-case word each.

Every option that takes a value names it with a metavar (``--limit N``, ``--older-than DURATION``)
and every argument too (``DEVICE``, ``ENTRY_ID``). Typer would show arguments as ``{DEVICE}`` in
the usage line and ``DEVICE <str>`` in their row, and an option without a metavar as
``<int range>``; :class:`TpxCommand` lays arguments out as click always did instead (``DEVICE``
required, ``[ENTRY_ID]...`` optional and repeatable). tests/test_cli_help.py holds the
vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from typer.core import TyperCommand

if TYPE_CHECKING:  # typer vendors click as typer._click: the types of the methods overridden
    from typer._click import Context, HelpFormatter, Parameter


def argument_placeholder(param: Parameter, usage: bool = False) -> str:
    """``DEVICE``; ``ENTRY_ID...`` when repeatable; in the usage line, ``[…]`` when optional."""
    name = str(param.metavar or param.name).upper()
    if usage and not param.required:
        name = f"[{name}]"
    return f"{name}..." if param.nargs != 1 else name


class TpxCommand(TyperCommand):
    """A typer command whose arguments read ``DEVICE`` in the usage line and in their row."""

    def collect_usage_pieces(self, ctx: Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(argument_placeholder(param, usage=True))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def format_options(self, ctx: Context, formatter: HelpFormatter) -> None:
        arguments: list[tuple[str, str]] = []
        options: list[tuple[str, str]] = []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":  # typer's row is "DEVICE <str>": the name only
                arguments.append((argument_placeholder(param), record[1]))
            else:
                options.append(record)
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
