"""`tpx dlq list / show / replay / drain / reasons / export / delete / purge`: inspect and fix
dead letters."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from tpx import exitcodes
from tpx.cli.options import DLQ_OPTIONS, DryRun, Invocation, emit, fail, guarded, with_settings
from tpx.config import parse_duration

app = typer.Typer(
    help="Inspect, replay, export, delete and purge dead letters.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

#: The stages a dead letter has (contract §3), spelled here so `tpx --help` loads no contract.
STAGES = ("decode", "write")


def _stage(value: str | None) -> str | None:
    if value is not None and value not in STAGES:
        raise typer.BadParameter(f"{value!r} is not a stage: give {' or '.join(STAGES)}")
    return value


StageOpt = Annotated[
    str | None,
    typer.Option("--stage", callback=_stage, metavar="STAGE", help="Only this stage: decode or write."),
]
DeviceOpt = Annotated[str | None, typer.Option("--device", metavar="DEVICE", help="Only this device_id.")]
MaxReplays = Annotated[
    int | None,
    typer.Option(
        "--max-replays", min=0, metavar="N", help="Refuse entries already replayed this many times."
    ),
]


@app.command("list")
@with_settings(*DLQ_OPTIONS, json=True)
def list_letters(
    cmd: Invocation,
    stage: StageOpt = None,
    device: DeviceOpt = None,
    limit: Annotated[int, typer.Option(min=1, metavar="N", help="At most this many, newest first.")] = 50,
) -> None:
    """What was rejected, and why? The newest dead letters.

    Example: tpx dlq list --stage decode --limit 20
    """
    from tpx.cli import render
    from tpx.ops import dlq

    with cmd.redis() as client:
        letters = cmd.guarded(lambda: dlq.list_letters(client, cmd.settings, stage, device, limit))
    cmd.answer([letter.to_dict() for letter in letters], lambda: render.print_letters(letters))


@app.command("show")
@with_settings(*DLQ_OPTIONS, json=True)
def show(
    cmd: Invocation,
    entry_id: Annotated[str, typer.Argument(metavar="ENTRY_ID", help="The dead letter's id.")],
) -> None:
    """One dead letter with its full original payload.

    Example: tpx dlq show 1732800000000-0
    """
    from tpx.cli import render
    from tpx.ops import dlq

    with cmd.redis() as client:
        letter = cmd.guarded(lambda: dlq.show(client, cmd.settings, entry_id))
    cmd.answer(letter.to_dict(), lambda: render.print_letter(letter))


@app.command("replay")
@with_settings(*DLQ_OPTIONS, json=True)
def replay(
    cmd: Invocation,
    ids: Annotated[list[str] | None, typer.Argument(metavar="ENTRY_ID", help="Dead letter ids.")] = None,
    replay_all: Annotated[
        bool, typer.Option("--all", help="Every dead letter matching the filters.")
    ] = False,
    stage: StageOpt = None,
    device: DeviceOpt = None,
    max_replays: MaxReplays = None,
    dry_run: DryRun = False,
) -> None:
    """Put dead letters back on the input stream (replays + 1), each moved atomically.

    Example: tpx dlq replay --all --stage write --max-replays 3
    """
    if not ids and not replay_all:
        fail("give the dead letter ids to replay, or --all (with --stage/--device filters)", exitcodes.USAGE)
    if ids and replay_all:
        fail("give dead letter ids or --all, not both", exitcodes.USAGE)
    if ids and (stage or device):
        fail("--stage and --device filter --all; they do not apply to explicit ids", exitcodes.USAGE)
    _replay(cmd, ids or [], replay_all, stage, device, max_replays, dry_run)


def _replay(
    cmd: Invocation,
    ids: list[str],
    replay_all: bool,
    stage: str | None,
    device: str | None,
    max_replays: int | None,
    dry_run: bool,
) -> None:
    from tpx.cli import render
    from tpx.ops import dlq

    with cmd.redis() as client:
        cmd.guarded(lambda: [dlq.check_id(entry_id) for entry_id in ids])
        chosen = (
            cmd.guarded(lambda: dlq.matching_ids(client, cmd.settings, stage, device)) if replay_all else ids
        )
        with render.progress_bar("replaying", len(chosen)) as advance:
            results = cmd.guarded(
                lambda: dlq.replay(client, cmd.settings, chosen, max_replays, dry_run, advance)
            )
    cmd.answer([asdict(r) for r in results], lambda: render.print_replays(results))
    if any(r.outcome == "missing" for r in results) and not replay_all:
        raise typer.Exit(exitcodes.ERROR)


@app.command("drain")
@with_settings(*DLQ_OPTIONS, json=True)
def drain(
    cmd: Invocation,
    stage: StageOpt = None,
    device: DeviceOpt = None,
    max_replays: MaxReplays = None,
    dry_run: DryRun = False,
) -> None:
    """Replay every matching dead letter; with --dry-run, a histogram of why they failed.

    Example: tpx dlq drain --dry-run
    """
    if not dry_run:
        _replay(cmd, [], True, stage, device, max_replays, False)
        return
    _reasons(cmd, stage, device, "failure reasons (dry run: nothing replayed)")


@app.command("reasons")
@with_settings(*DLQ_OPTIONS, json=True)
def reasons(cmd: Invocation, stage: StageOpt = None, device: DeviceOpt = None) -> None:
    """Why things fail: the dead letters' reasons (values blanked), most frequent first.

    Example: tpx dlq reasons --stage write
    """
    _reasons(cmd, stage, device, "failure reasons")


def _reasons(cmd: Invocation, stage: str | None, device: str | None, title: str) -> None:
    from tpx.cli import render
    from tpx.ops import dlq

    with cmd.redis() as client:
        letters = cmd.guarded(lambda: list(dlq.iter_letters(client, cmd.settings, stage, device)))
    rows = dlq.histogram(letters)
    cmd.answer(
        [{"stage": st, "reason": why, "count": n} for st, why, n in rows],
        lambda: render.print_histogram(rows, title),
    )


@app.command("export")
@with_settings(*DLQ_OPTIONS, json=True)
def export(
    cmd: Invocation,
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Where to write JSON lines ('-' for stdout).")],
    stage: StageOpt = None,
    device: DeviceOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite FILE if it exists.")] = False,
) -> None:
    """Write dead letters as JSON lines (id, dlq fields, original fields); an existing FILE is
    kept unless --force. With --json, the summary is a JSON object.

    Example: tpx dlq export /tmp/dlq-$(date +%F).jsonl --stage decode
    """
    from tpx.cli import render
    from tpx.ops import dlq

    to_stdout = str(file) == "-"
    if to_stdout and cmd.as_json:
        fail("--json with FILE '-': the dead letters are the JSON lines on stdout already", exitcodes.USAGE)
    if not to_stdout and file.exists() and not force:
        fail(f"{file} exists: give --force to overwrite it, or another FILE", exitcodes.USAGE)
    with cmd.redis() as client:
        total = cmd.guarded(lambda: dlq.length(client, cmd.settings))
        with render.progress_bar("exporting", total) as advance:
            if to_stdout:
                count = cmd.guarded(
                    lambda: dlq.export(client, cmd.settings, sys.stdout, stage, device, advance)
                )
            else:
                try:
                    count = cmd.guarded(
                        lambda: dlq.export_file(
                            client,
                            cmd.settings,
                            file,
                            overwrite=force,
                            stage=stage,
                            device=device,
                            progress=advance,
                        )
                    )
                except FileExistsError:  # created since the check above
                    fail(f"{file} exists: give --force to overwrite it, or another FILE", exitcodes.USAGE)
                except OSError as exc:
                    fail(f"cannot write {file}: {exc.strerror}", exitcodes.ERROR)
    if to_stdout:
        return
    if cmd.as_json:
        emit({"exported": count, "file": str(file)}, indent=None)
    else:
        render.err_console.print(f"exported {count:,} dead letters to {file}")


@app.command("delete")
@with_settings(*DLQ_OPTIONS, json=True)
def delete(
    cmd: Invocation,
    ids: Annotated[list[str], typer.Argument(metavar="ENTRY_ID", help="Dead letter ids.")],
    dry_run: DryRun = False,
) -> None:
    """Delete dead letters by id (export them first if you may need them).

    Example: tpx dlq delete 1732800000000-0 1732800000001-0
    """
    from tpx.cli import render
    from tpx.ops import dlq

    with cmd.redis() as client:
        result = cmd.guarded(lambda: dlq.delete(client, cmd.settings, ids, dry_run))
    cmd.answer(asdict(result), lambda: render.print_delete(result))
    if result.missing:
        raise typer.Exit(exitcodes.ERROR)


@app.command("purge")
@with_settings(*DLQ_OPTIONS, json=True)
def purge(
    cmd: Invocation,
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than", metavar="DURATION", help="Dead-lettered longer ago than this: 7d, 12h, 90m."
        ),
    ] = None,
    stage: StageOpt = None,
    device: DeviceOpt = None,
    reason: Annotated[
        str | None, typer.Option("--reason", metavar="TEXT", help="Only those whose error contains TEXT.")
    ] = None,
    dry_run: DryRun = False,
) -> None:
    """Delete the dead letters matching every filter given (at least one).

    Example: tpx dlq purge --stage decode --reason "out of range" --dry-run
    """
    from tpx.cli import render
    from tpx.ops import dlq

    filters = {k: v for k, v in {"stage": stage, "device": device, "reason": reason}.items() if v is not None}
    if older_than is None and not filters:
        fail("give --older-than, --stage, --device or --reason (every filter given applies)", exitcodes.USAGE)
    seconds = None if older_than is None else guarded(lambda: parse_duration(older_than))
    with cmd.redis() as client:
        if filters or seconds is None:
            result = cmd.guarded(lambda: dlq.purge_matching(client, cmd.settings, filters, seconds, dry_run))
        else:  # by age alone: one XTRIM MINID
            result = cmd.guarded(lambda: dlq.purge(client, cmd.settings, seconds, dry_run))
    cmd.answer(asdict(result), lambda: render.print_purge(result))
