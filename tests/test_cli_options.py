"""The shared settings flags: declared once (tpx.cli.options), each command's set pinned.

Runs the real command line (typer's runner) and a command built with :func:`with_settings` the
way the real ones are; no server is needed.
"""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from tpx.cli import app
from tpx.cli.options import DLQ_OPTIONS, GROUP_OPTIONS, Invocation, with_settings

runner = CliRunner()

#: Every command's flags, as `tpx <command> --help` lists them (own flags, then the settings ones).
FLAGS = {
    "serve": "--redis-url --database-url --db-schema --stream --group --consumer --http-addr --writers "
    "--batch-size --batch-max-latency-ms --read-count --queue-batches --device-cache-size "
    "--drain-timeout-s --migrate --log-level --log-format",
    "migrate": "--dry-run --database-url --db-schema --compress-after --retain-for --json",
    "config": "--json",
    "top": "--interval --redis-url --database-url --db-schema --stream --group",
    "demo": "--headless --duration --rate --devices --poison --data-dir --json",
    "simulate": "--devices --rate --duration --count --duplicates --late --poison --seed --start "
    "--redis-url --stream --json",
    "status": "--watch --interval --redis-url --stream --group --json",
    "pending": "--consumer --min-idle --limit --redis-url --stream --group --json",
    "claim": "--dead-consumer --min-idle --force --dry-run --redis-url --database-url --db-schema --stream "
    "--group --json",
    "rehydrate": "--timeout --dry-run --redis-url --stream --json",
    "device": "--limit --timeout --redis-url --database-url --db-schema --stream --json",
    "groups": "--match --redis-url --json",
    "group reset": "--to-datetime --to-earliest --to-latest --dry-run --redis-url --stream --group --json",
    "group prune": "--dry-run --redis-url --stream --group --json",
    "dlq list": "--stage --device --limit --redis-url --stream --json",
    "dlq show": "--redis-url --stream --json",
    "dlq replay": "--all --stage --device --max-replays --dry-run --redis-url --stream --json",
    "dlq drain": "--stage --device --max-replays --dry-run --redis-url --stream --json",
    "dlq export": "--stage --device --force --redis-url --stream --json",
    "dlq purge": "--older-than --stage --device --reason --dry-run --redis-url --stream --json",
    "dlq delete": "--dry-run --redis-url --stream --json",
    "dlq reasons": "--stage --device --redis-url --stream --json",
}


def listed_flags(help_text: str) -> list[str]:
    """The long flag of each option in a --help's Options section, in order (not --help)."""
    section = help_text.split("Options:", 1)[1]
    flags = re.findall(r"^\s+(?:-\w, )?(--[a-z-]+)", section, re.M)
    return [f for f in flags if f != "--help"]


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_each_command_keeps_its_flags(command: str) -> None:
    result = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert listed_flags(result.stdout) == FLAGS[command].split()


def probe_app(*fields: str, json: bool = True) -> tuple[typer.Typer, list[Invocation]]:
    """A one-command app whose command records the Invocation it was handed."""
    seen: list[Invocation] = []
    probe = typer.Typer()

    @probe.command()
    @with_settings(*fields, json=json)
    def look(cmd: Invocation, limit: int = 5) -> None:
        seen.append(cmd)
        typer.echo(f"{cmd.settings.stream} {cmd.settings.group} {limit} {cmd.as_json}")

    @probe.command()
    def other() -> None:  # two commands, so the probe is called by name like the real ones
        pass

    return probe, seen


def test_flags_override_the_environment_and_reach_one_settings_object() -> None:
    probe, seen = probe_app(*GROUP_OPTIONS)
    env = {"TPX_STREAM": "from-env", "TPX_GROUP": "env-group"}
    result = runner.invoke(probe, ["look", "--stream", "from-flag", "--limit", "7", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "from-flag env-group 7 True"
    assert seen[0].overrides == {"redis_url": None, "stream": "from-flag", "group": None}
    result = runner.invoke(probe, ["look"], env=env)
    assert result.stdout.strip() == "from-env env-group 5 False"


def test_a_flag_not_declared_for_a_command_is_refused() -> None:
    probe, _ = probe_app(*DLQ_OPTIONS)  # the dead-letter commands take no --group
    result = runner.invoke(probe, ["look", "--group", "g"])
    assert result.exit_code == 2 and "No such option: --group" in result.output


def test_an_invalid_setting_is_one_line_and_exit_2() -> None:
    probe, _ = probe_app(*GROUP_OPTIONS)
    result = runner.invoke(probe, ["look"], env={"TPX_READ_COUNT": "many"})
    assert result.exit_code == 2
    assert result.stderr.startswith("tpx: invalid setting TPX_READ_COUNT:")  # look takes no --read-count
    assert "Traceback" not in result.output


def test_settings_load_only_when_a_command_reads_them() -> None:
    """`tpx dlq replay` with no ids fails on its arguments, not on a bad setting it never read."""
    result = runner.invoke(app, ["dlq", "replay"], env={"TPX_READ_COUNT": "many"})
    assert result.exit_code == 2 and "give the dead letter ids to replay, or --all" in result.stderr
    assert "invalid setting" not in result.stderr


def test_declaring_a_shared_flag_twice_or_an_unknown_one_fails_at_import() -> None:
    with pytest.raises(TypeError, match="declares shared flags itself: stream"):

        @with_settings("stream")
        def twice(cmd: Invocation, stream: str = "") -> None:
            pass

    with pytest.raises(TypeError, match="not settings flags: colour"):
        with_settings("colour")


def test_setting_errors_name_only_flags_the_command_has() -> None:
    """`tpx serve` has --writers and --migrate, no --claim-idle-ms, --late-window or --max-future-s."""
    cases = {
        "TPX_WRITERS": ("0", "tpx: invalid setting TPX_WRITERS / --writers: "),
        "TPX_MIGRATE_ON_START": ("perhaps", "tpx: invalid setting TPX_MIGRATE_ON_START / --migrate: "),
        "TPX_CLAIM_IDLE_MS": ("5", "tpx: invalid setting TPX_CLAIM_IDLE_MS: "),
        "TPX_MAX_FUTURE_S": ("-1", "tpx: invalid setting TPX_MAX_FUTURE_S: "),
    }
    for name, (value, line) in cases.items():
        result = runner.invoke(app, ["serve"], env={name: value})
        assert result.exit_code == 2 and result.stderr.startswith(line), (name, result.stderr)
    result = runner.invoke(app, ["serve"], env={"TPX_LATE_WINDOW": "banana"})
    assert result.stderr.count("banana") == 1 and "not a duration: 'banana'" in result.stderr


def test_a_cross_setting_error_names_the_setting_at_fault() -> None:
    env = {"TPX_COMPRESS_AFTER": "14d", "TPX_RETAIN_FOR": "7d"}
    result = runner.invoke(app, ["migrate", "--json"], env=env)
    assert result.exit_code == 2
    assert result.stderr.startswith("tpx: invalid setting TPX_RETAIN_FOR / --retain-for: 7d must be longer")


def test_a_misspelled_tpx_variable_gets_one_warning() -> None:
    result = runner.invoke(app, ["config", "--json"], env={"TPX_BATCH_SIZ": "5"})
    assert result.exit_code == 0
    assert (
        result.stderr
        == "tpx: warning: TPX_BATCH_SIZ is not a tpx setting; ignored (did you mean TPX_BATCH_SIZE?)\n"
    )


def test_serve_help_describes_every_option_with_its_default() -> None:
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "400"})
    section = result.stdout.split("Options:", 1)[1]
    blocks = re.split(r"\n(?=\s+--)", section.strip("\n"))  # one per option, its wrapped lines joined
    rows = [" ".join(b.split()) for b in blocks if not b.strip().startswith("--help")]
    assert len(rows) == len(FLAGS["serve"].split())
    for row in rows:
        assert re.fullmatch(r"--[\w/ -]+ (<\w+> )?\w.* \[env TPX_[A-Z_]+; default: [^\]]+\]", row), row


def test_root_help_does_not_cut_summaries() -> None:
    for args in ([], ["dlq"], ["group"]):
        result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "400"})
        commands = result.stdout.split("Commands:", 1)[1]
        assert "..." not in commands, commands
    listed = " ".join(runner.invoke(app, ["--help"]).stdout.split())
    assert "serve Run the engine: read the stream, write positions, until SIGTERM/SIGINT." in listed
