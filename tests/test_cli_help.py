"""`tpx <command> --help` spells every placeholder one way: upper case, one name per kind of value.

Walks the real command tree (the click commands typer builds from tpx's app): every option that
takes a value and every argument has an upper-case metavar from one vocabulary, and the rendered
help shows them so (no ``{DEVICE}``, ``[[ID...]]...`` or ``<int range>``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from tpx.cli import app

runner = CliRunner()

#: The placeholders tpx's help uses, each for one kind of value.
VOCABULARY = {
    "URL",  # a server's URL (or key=value DSN)
    "NAME",  # a schema, group, consumer
    "KEY",  # a Redis key
    "ADDR",  # host:port or off
    "N",  # a count
    "MS",  # milliseconds
    "SECONDS",  # seconds, a number
    "DURATION",  # a tpx duration: 90s, 12h, 7d
    "TIME",  # a point in time
    "LEVEL",
    "FORMAT",
    "RATE",
    "FRACTION",
    "DIR",
    "FILE",
    "DEVICE",
    "GEOFENCE",  # a geofence's id
    "ENTRY_ID",
    "STAGE",
    "TEXT",
    "PATTERN",
}
#: A usage line's pieces that are not placeholders of a value.
USAGE_WORDS = {"[OPTIONS]", "COMMAND", "[ARGS]..."}
#: One argument in a usage line: ``DEVICE``, ``[ENTRY_ID]...``, ``ENTRY_ID...``.
USAGE_ARGUMENT = re.compile(r"(\[)?(?P<name>[A-Z][A-Z_]*)(?(1)\])(\.\.\.)?")


def commands(group: Any = None, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, click command) for every command and group under ``group`` (the root: tpx's app)."""
    group = typer.main.get_command(app) if group is None else group
    yield path, group
    for name, sub in sorted(getattr(group, "commands", {}).items()):
        yield from commands(sub, (*path, name))


ALL = list(commands())


def takes_a_value(param: Any) -> bool:
    return param.param_type_name == "argument" or not (param.is_flag or param.count)


@pytest.mark.parametrize(("path", "command"), ALL, ids=[" ".join(p) or "tpx" for p, _ in ALL])
def test_every_placeholder_is_upper_case_from_one_vocabulary(path: tuple[str, ...], command: Any) -> None:
    params = [p for p in command.params if takes_a_value(p) and p.name != "help"]
    for param in params:
        assert param.metavar is not None, f"tpx {' '.join(path)}: {param.name} has no metavar"
        assert param.metavar in VOCABULARY, f"tpx {' '.join(path)}: {param.name} is {param.metavar!r}"

    result = runner.invoke(app, [*path, "--help"], prog_name="tpx", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "{" not in text and "}" not in text, text
    assert not re.search(r"(?m)(--[a-z-]+|^ +[A-Z_]+(\.\.\.)?) <", text), text  # no <str>, <int range>
    usage = text.split("\n\n", 1)[0].split()
    assert usage[:2] == ["Usage:", "tpx"] and usage[2 : 2 + len(path)] == list(path), usage
    for piece in usage[2 + len(path) :]:
        assert piece in USAGE_WORDS or USAGE_ARGUMENT.fullmatch(piece), f"{piece!r} in {usage}"
    for param in params:
        if param.param_type_name == "option":
            assert re.search(rf"{re.escape(param.opts[-1])} {param.metavar}\b", text), (param.name, text)
        else:
            assert re.search(rf"(?m)^  {param.metavar}(\.\.\.)?  ", text), (param.name, text)


def test_arguments_read_the_same_in_usage_rows_and_errors() -> None:
    assert (
        "Usage: tpx dlq replay [OPTIONS] [ENTRY_ID]...\n"
        in runner.invoke(app, ["dlq", "replay", "--help"], prog_name="tpx").stdout
    )
    assert (
        "Usage: tpx dlq delete [OPTIONS] ENTRY_ID...\n"
        in runner.invoke(app, ["dlq", "delete", "--help"], prog_name="tpx").stdout
    )
    missing = runner.invoke(app, ["rehydrate"], prog_name="tpx")
    assert missing.exit_code == 2
    assert "Usage: tpx rehydrate [OPTIONS] DEVICE" in missing.output
    assert "Missing argument 'DEVICE'" in missing.output
