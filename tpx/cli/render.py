"""Human renderings of the ops results (rich tables, progress bars); ``--json`` bypasses this module.

The plain-text pieces the dashboard shows too (times, ages, a consumer's cells) come from
:mod:`tpx.format`; this module only lays them out for a terminal.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console, ConsoleDimensions, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from tpx.format import CONSUMER_COLUMNS, ago, claim_command, consumer_cells, consumer_known, ms_time, us_time

if TYPE_CHECKING:  # types only: importing tpx.ops.claim would load the engine for every command
    from tpx.ops.claim import ClaimReport
    from tpx.ops.control import ControlResult, DeviceReport
    from tpx.ops.dlq import DeadLetterView, DeleteResult, PurgeResult, ReplayResult
    from tpx.ops.geofences import GeofenceStatus
    from tpx.ops.groups import Listing, PruneResult, ResetResult
    from tpx.ops.inspect import PendingEntry, Status
    from tpx.ops.recompute import RecomputeResult
    from tpx.ops.timing import DeviceTiming, TimingRow
    from tpx.simulate import SimulationReport

#: The width rich lays output out in when it does not go to a terminal: wide enough that no row
#: of tpx's wraps or folds (kubectl and kafka-consumer-groups never wrap into a pipe either).
UNWRAPPED_WIDTH = 1 << 16


class _Console(Console):
    """A rich Console that squeezes nothing to 80 columns when its output is a pipe or a file."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return size if self.is_terminal else ConsoleDimensions(UNWRAPPED_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


console = _Console(highlight=False)
err_console = _Console(stderr=True, highlight=False)
#: The consumer table's text columns; the numbers are right-aligned.
_LEFT_COLUMNS = ("consumer", "state")


@contextlib.contextmanager
def progress_bar(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr (only on a terminal); yields ``advance(n)``."""
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

        def advance(n: int = 1) -> None:
            bar.advance(task, n)

        yield advance


#: Seconds between the plain progress lines written when stderr is not a terminal (a CI log
#: gets a line every few seconds, not one per half second).
PLAIN_PROGRESS_EVERY_S = 5.0


@contextlib.contextmanager
def simulation_progress(total: int | None) -> Iterator[Callable[[int, float], None]]:
    """`tpx simulate`'s progress on stderr: a rich progress display on a terminal, else a plain
    line every :data:`PLAIN_PROGRESS_EVERY_S`; yields ``show(produced, per_s)``."""
    if not sys.stderr.isatty():
        last = time.monotonic()

        def line(produced: int, per_s: float) -> None:
            nonlocal last
            if time.monotonic() - last >= PLAIN_PROGRESS_EVERY_S:
                last = time.monotonic()
                err_console.print(f"simulate: {produced:,} records published, {per_s:,.0f}/s")

        yield line
        return
    bar = Progress(
        TextColumn("publishing"),
        BarColumn(),
        TextColumn("{task.completed:,.0f} records  {task.fields[rate]}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )
    with bar:
        task = bar.add_task("publishing", total=total, rate="")
        yield lambda produced, per_s: bar.update(task, completed=produced, rate=f"{per_s:,.0f}/s")


@contextlib.contextmanager
def live_status() -> Iterator[Callable[[Status], None]]:
    """`tpx status --watch`: yields ``show(status)``, which redraws the screen in place."""
    with Live(console=console, auto_refresh=False) as live:
        yield lambda st: live.update(Group(*status_renderables(st)), refresh=True)


def status_renderables(st: Status) -> list[Any]:
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row(
        "stream",
        f"{st.stream}  ({st.stream_length:,} entries"
        + (f", newest {ago(st.last_entry_age_s)} ago)" if st.last_entry_id else ")")
        if st.stream_exists
        else f"{st.stream}  (does not exist yet)",
    )
    lag = "unknown" if st.lag is None else f"{st.lag:,}"
    head.add_row("group", f"{st.group}  lag {lag}" if st.group_exists else f"{st.group}  (not created yet)")
    oldest = f", oldest {ago(st.oldest_pending_age_s)} old" if st.oldest_pending_id else ""
    head.add_row("pending", f"{st.pending:,}{oldest}")
    head.add_row("dead letters", f"{st.dlq_length:,}")
    failing = [c.name for c in st.consumers if c.alive and c.failing is not None]
    head.add_row(
        "instances",
        f"{len(st.instances)} alive" + (f", writers failing on {', '.join(failing)}" if failing else ""),
    )
    if st.deferring or st.domain_workers:
        head.add_row("domain", domain_line(st))
    out: list[Any] = [head]
    if st.consumers:
        table = Table(title="consumers", title_justify="left", expand=False)
        for column in CONSUMER_COLUMNS:
            table.add_column(column, justify="left" if column in _LEFT_COLUMNS else "right")
        for c in st.consumers:
            table.add_row(*consumer_cells(c))
        out.append(table)
    known = {c.name for c in st.consumers}
    starting = [i for i in st.instances if i.consumer not in known]
    if starting:
        out.append("instances not yet in the group: " + ", ".join(i.consumer for i in starting))
    for c in st.consumers:
        if not c.alive and c.pending:
            out.append(Text(consumer_known(c)))
    for c in st.heartbeat_missing:
        if c.pending:
            out.append(
                Text(
                    f"{c.name} has no heartbeat but answers on HTTP: do not claim its entries while "
                    "it runs (see OPERATIONS.md, Redis outage)"
                )
            )
    for c in st.dead_with_pending:
        out.append(
            Text(f"{c.name} is dead and holds {c.pending:,} pending entries: run {claim_command(c.name)}")
        )
    return out


def domain_line(st: Status) -> str:
    """Who defers the domain, and whether a `tpx domain` takes what they queue."""
    n = len(st.deferring)
    parts = [f"{n} instance{'s' if n != 1 else ''} defer{'' if n != 1 else 's'} to tpx domain"] if n else []
    if not st.domain_workers:
        parts.append("no tpx domain alive: their timing records wait (OPERATIONS.md, Run the domain apart)")
    for w in st.domain_workers:
        waited = f", the oldest waiting {ago(w.waiting_s)}" if w.waiting_s else ""
        line = f"{w.consumer} alive, {w.waiting_devices:,} devices waiting{waited}"
        if w.problem is not None:
            line += f" ({w.problem})"
        parts.append(line)
    return "; ".join(parts)


def print_status(st: Status) -> None:
    for item in status_renderables(st):
        console.print(item)


def print_pending(rows: list[PendingEntry]) -> None:
    if not rows:
        console.print("no pending entries")
        return
    table = Table()
    for column in ("id", "consumer", "device", "idle", "deliveries", "age", "last error"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r.id,
            r.consumer,
            r.device_id or "(gone)",
            ago(r.idle_ms / 1000),
            str(r.deliveries),
            ago(r.age_s),
            r.last_error or "-",
        )
    console.print(table)


def print_letters(letters: list[DeadLetterView]) -> None:
    if not letters:
        console.print("no dead letters")
        return
    table = Table()
    table.add_column("id", no_wrap=True)
    table.add_column("stage", no_wrap=True)
    table.add_column("device", overflow="fold")
    table.add_column("deliv", justify="right")
    table.add_column("repl", justify="right")
    table.add_column("age", no_wrap=True)
    table.add_column("error", overflow="fold", ratio=1)
    for letter in letters:
        table.add_row(
            letter.id,
            letter.stage,
            letter.device_id,
            str(letter.deliveries),
            str(letter.replays),
            ago(letter.age_s),
            letter.error,
        )
    console.print(table)


def print_letter(letter: DeadLetterView) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    grid.add_row("id", letter.id)
    grid.add_row("stage", letter.stage)
    grid.add_row("error", letter.error)
    grid.add_row("source id", letter.source_id)
    grid.add_row("deliveries", str(letter.deliveries))
    grid.add_row("consumer", letter.consumer)
    grid.add_row("dead-lettered", ms_time(letter.at_ms) if letter.at_ms else "-")
    grid.add_row("replays", str(letter.replays))
    console.print(grid)
    console.print("[bold]original fields[/bold]")
    for key, value in letter.original().items():
        shown = value
        if key == "record":
            with contextlib.suppress(ValueError):  # not JSON: shown as it came
                shown = json.dumps(json.loads(value), indent=2)
        console.print(f"  {key}: {shown}", markup=False, highlight=False)


def print_replays(results: list[ReplayResult]) -> None:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
        if r.outcome == "replayed":
            console.print(f"replayed {r.id} -> {r.new_id}")
        elif r.outcome in ("refused", "would-refuse"):
            console.print(f"{r.outcome} {r.id}: already replayed {r.replays} times")
        elif r.outcome == "missing":
            console.print(f"missing {r.id}: no such dead letter")
        else:
            console.print(f"{r.outcome} {r.id}")
    summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "nothing to do"
    console.print(summary)
    warned = [r for r in results if r.warning]
    if warned:
        from tpx.ops.dlq import decode_replay_warning

        verb = "would replay" if warned[0].outcome == "would-replay" else "replayed"
        console.print(f"warning: {decode_replay_warning(len(warned), verb)}")


def print_histogram(rows: list[tuple[str, str, int]], title: str = "failure reasons") -> None:
    if not rows:
        console.print("no dead letters match")
        return
    table = Table(title=title, title_justify="left")
    table.add_column("count", justify="right", no_wrap=True)
    table.add_column("stage", no_wrap=True)
    table.add_column("reason", overflow="fold")
    for stage, why, n in rows:
        table.add_row(f"{n:,}", stage, why)
    console.print(table)


def print_purge(result: PurgeResult) -> None:
    verb = "would delete" if result.dry_run else "deleted"
    which = [f"{k} {v!r}" if k == "reason" else f"{k} {v}" for k, v in result.filters.items()]
    if result.cutoff_ms is not None:
        which.append(f"older than {ms_time(result.cutoff_ms)} UTC")
    console.print(f"{verb} {result.removed:,} dead letters ({', '.join(which)})")


def print_delete(result: DeleteResult) -> None:
    verb = "would delete" if result.dry_run else "deleted"
    console.print(
        f"{verb} {len(result.deleted):,} dead letters"
        + (": " if result.deleted else "")
        + " ".join(result.deleted)
    )
    if result.missing:
        console.print(f"no such dead letter: {' '.join(result.missing)}")


def print_claim(r: ClaimReport) -> None:
    if r.dry_run:
        console.print(f"would claim {r.claimed:,} of {r.pending_before:,} pending entries of {r.consumer}")
        return
    console.print(
        f"claimed {r.claimed:,} entries of {r.consumer}: {r.written:,} written, {r.duplicates:,} already "
        f"stored, {r.dead_lettered:,} dead-lettered, {r.vanished:,} gone from the stream"
    )
    if r.left_pending:
        console.print(
            f"{r.left_pending:,} refused by the database stay pending under {r.claimer} "
            "for redelivery by the running instances"
        )
    console.print(
        f"consumer {r.consumer} removed from the group"
        if r.consumer_removed
        else f"consumer {r.consumer} still has pending entries (idle below --min-idle): not removed"
    )


def print_control(result: ControlResult) -> None:
    if result.confirmed:
        console.print(f"{result.op} {result.device}: confirmed by {', '.join(result.confirmed)}")
    else:
        console.print(f"{result.op} {result.device}: no instance answered")
    if result.silent:
        console.print(f"no answer from: {', '.join(result.silent)}")


def print_reload(result: ControlResult) -> None:
    reloading = sorted(str(r.get("consumer")) for r in result.replies if r.get("reloaded"))
    without = sorted(str(r.get("consumer")) for r in result.replies if r.get("ok") and not r.get("reloaded"))
    if reloading:
        console.print(f"geofences reloading now in {', '.join(reloading)}")
    if without:
        console.print(
            f"no geofences held in {', '.join(without)} (TPX_DOMAIN off, its tables missing, or"
            " TPX_DOMAIN_DEFER: tpx domain holds them)"
        )
    if not result.replies:
        console.print("no instance answered: nothing to reload")
    if result.silent:
        console.print(f"no answer from: {', '.join(result.silent)}")


def print_rehydrate_plan(device: str, asked: list[str]) -> None:
    if asked:
        console.print(f"would ask {', '.join(asked)} to drop the cached state of {device} (dry run)")
    else:
        console.print(f"no running instance to ask about {device} (dry run)")


def print_device(report: DeviceReport) -> None:
    if report.cached:
        for item in report.cached:
            state = item["state"]
            last = ms_time(state["last_ts_us"] // 1000) if state.get("last_ts_us") else "-"
            console.print(
                f"cached by {item['consumer']}: last fix {last} at {state.get('latitude')}, "
                f"{state.get('longitude')}; records {state.get('records')}, duplicates "
                f"{state.get('duplicates')}, out of order {state.get('out_of_order')}"
            )
    else:
        console.print(f"{report.device}: not cached by any running instance")
    if report.silent:
        console.print(f"no answer from: {', '.join(report.silent)}")
    if not report.rows:
        console.print("no rows in positions")
        return
    table = Table(title=f"newest rows of {report.device}", title_justify="left")
    for column in ("ts", "latitude", "longitude", "speed", "satellites", "valid"):
        table.add_column(column)
    for row in report.rows:
        table.add_row(
            str(row["ts"]),
            str(row["latitude"]),
            str(row["longitude"]),
            str(row["speed"]),
            str(row["satellites"]),
            str(row["valid"]),
        )
    console.print(table)


def print_simulation(report: SimulationReport, stream: str) -> None:
    console.print(
        f"published {report.produced:,} records to {stream} in {report.seconds:.1f}s "
        f"({report.rate:,.0f}/s): {report.duplicates:,} duplicates, {report.late:,} late, "
        f"{report.poison:,} poison"
    )


def print_groups(listing: Listing) -> None:
    if not listing.streams:
        console.print("no streams match")
        return
    table = Table()
    for column in ("stream", "entries", "group", "consumers", "pending", "lag", "last delivered"):
        table.add_column(
            column, justify="left" if column in ("stream", "group", "last delivered") else "right"
        )
    for st in listing.streams:
        if not st.groups:
            table.add_row(st.stream, f"{st.length:,}", "-", "-", "-", "-", "-")
        for g in st.groups:
            lag = "unknown" if g.lag is None else f"{g.lag:,}"
            table.add_row(
                st.stream,
                f"{st.length:,}",
                g.name,
                str(g.consumers),
                f"{g.pending:,}",
                lag,
                g.last_delivered_id,
            )
    console.print(table)
    if listing.truncated:
        console.print(f"more streams than the {len(listing.streams)} listed: narrow with --match")


def print_reset(r: ResetResult) -> None:
    verb = "would move" if r.dry_run else "moved"
    console.print(f"{verb} group {r.group} on {r.stream} from {r.old_id} to {r.new_id}")
    if r.reread:
        console.print(
            f"{r.reread:,} entries {'would be' if r.dry_run else 'will be'} read again (idempotent writes)"
        )
    if r.skipped:
        console.print(f"{r.skipped:,} entries {'would be' if r.dry_run else 'are'} skipped: never written")
    if not r.reread and not r.skipped:
        console.print("no entries between the two positions")
    if r.live:
        console.print(f"running instances read from the new position at once: {', '.join(r.live)}")


def print_prune(r: PruneResult) -> None:
    verb = "would remove" if r.dry_run else "removed"
    names = ", ".join(r.removed)
    console.print(
        f"{verb} {len(r.removed):,} consumers with no heartbeat and nothing pending"
        + (f": {names}" if names else "")
    )
    if r.kept:
        console.print(f"kept (they read entries meanwhile): {', '.join(r.kept)}")


def print_geofences(rows: list[GeofenceStatus], table_name: str) -> None:
    if not rows:
        console.print(f"no geofences in {table_name}")
        return
    table = Table()
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("name", overflow="fold")
    table.add_column("kind", no_wrap=True)
    table.add_column("active", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("reason", overflow="fold", ratio=1)
    for r in rows:
        table.add_row(str(r.id), r.name, r.kind, "yes" if r.active else "no", r.status, r.reason or "-")
    console.print(table)
    counts = {s: sum(1 for r in rows if r.status == s) for s in ("loaded", "inactive", "invalid")}
    console.print(", ".join(f"{n:,} {s}" for s, n in counts.items()))


def _optional(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_timing_rows(
    rows: list[TimingRow] | tuple[TimingRow, ...], title: str | None = None, devices: bool = True
) -> None:
    """Timing records as a table (``devices``: with a device column)."""
    table = Table(title=title, title_justify="left")
    table.add_column("time (UTC)", no_wrap=True)
    if devices:
        table.add_column("device", overflow="fold")
    table.add_column("geofence", overflow="fold")
    table.add_column("event", no_wrap=True)
    table.add_column("latitude", justify="right", no_wrap=True)
    table.add_column("longitude", justify="right", no_wrap=True)
    table.add_column("speed", justify="right", no_wrap=True)
    table.add_column("dir", justify="right", no_wrap=True)
    table.add_column("uncertainty s", justify="right", no_wrap=True)
    for r in rows:
        table.add_row(
            r.ts.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            *([r.device_id] if devices else []),
            f"{r.geofence_name} ({r.geofence})" if r.geofence_name is not None else f"({r.geofence}, gone)",
            r.event,
            f"{r.latitude:.7f}",
            f"{r.longitude:.7f}",
            _optional(r.speed, 1),
            "-" if r.direction is None else f"{r.direction:+d}",
            _optional(r.uncertainty_s, 1),
        )
    console.print(table)


def print_device_timing(report: DeviceTiming, since: dt.datetime | None = None) -> None:
    if not report.seen:
        console.print(f"{report.device_id}: not seen by the domain (no stored state)")
    elif report.state_error:
        console.print(f"{report.device_id}: state version {report.version}, {report.state_error}")
    else:
        inside = ", ".join(f"{i.name or '(gone)'} ({i.id})" for i in report.inside) or "no geofence"
        last = "-" if report.newest_us is None else us_time(report.newest_us) + " UTC"
        console.print(f"{report.device_id}: inside {inside}; last fix {last}; state version {report.version}")
    if report.missed_since is not None:
        fixes = f"{report.missed_fixes:,} fix" + ("" if report.missed_fixes == 1 else "es")
        console.print(
            f"{fixes} waiting, the oldest from {report.missed_since.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S}"
            " UTC (a batch failed, or left them for later or for tpx domain): their timing records"
            " wait for the repair or for tpx domain"
        )
    window = "" if since is None else f" since {since:%Y-%m-%d %H:%M:%S} UTC"
    if not report.records:
        console.print(f"no timing records{window}")
        return
    print_timing_rows(report.records, f"timing records{window}, newest first", devices=False)


def print_recompute(result: RecomputeResult) -> None:
    noun = "device" if result.devices == 1 else "devices"
    if result.dry_run:
        console.print(
            f"would recompute {result.devices:,} {noun}: {result.removed:,} records would be removed, "
            f"{result.written:,} written (dry run: nothing changed)"
        )
        return
    console.print(
        f"recomputed {result.devices:,} {noun}: {result.removed:,} records removed, "
        f"{result.written:,} written"
    )
