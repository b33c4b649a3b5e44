"""`tpx top`: the live dashboard an operator keeps open.

Refreshes run in a worker thread (:class:`~tpx.tui.poller.Poller`) and
re-arm a timer when they finish, so polls never overlap and the UI thread
never waits on Redis or Postgres. Each tab is a table widget
(:mod:`tpx.tui.tables`) that builds, filters and sorts its own rows from the
snapshot; this module keeps the layout, the refresh and the actions. Actions
(replay, claim, rehydrate) ask for confirmation, run in worker threads too,
and report with a notification.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, ClassVar

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Header, Input, Static, TabbedContent, TabPane
from textual.worker import get_current_worker

from tpx.config import Settings
from tpx.contract import STAGE_DECODE
from tpx.errors import first_line
from tpx.format import DEAD_WITH_PENDING, WRITERS_FAILING, ago, number
from tpx.ops.inspect import Status
from tpx.streams import EstimatedLag
from tpx.tui.poller import Poller, Snapshot
from tpx.tui.screens import (
    ConfirmScreen,
    DetailScreen,
    HelpScreen,
    device_detail,
    instance_detail,
    letter_detail,
)
from tpx.tui.sparkline import RateSparkline
from tpx.tui.tables import TABLES, DevicesTable, InstancesTable, LettersTable, SnapshotTable, TimingTable
from tpx.tui.tables.timing import timing_summary

#: Recent positions shown when a device is opened.
DEVICE_ROWS_SHOWN = 20
#: Timing records shown when a device is opened (its newest).
DEVICE_TIMING_SHOWN = 10


def lag_text(lag: int | None) -> str:
    """The group's lag; one tpx counted itself (Redis reported none) is marked as an estimate."""
    if lag is None:
        return "unknown"
    if isinstance(lag, EstimatedLag):
        return f"{'≥' if lag.at_least else '≈'}{lag:,} (est.)"
    return f"{lag:,}"


def _replay_question(question: str, decode: int) -> str:
    """A replay's confirmation; with decode-stage letters among them, the warning `tpx dlq replay`
    prints: they come straight back unless the decoder or the record changed."""
    from tpx.ops.dlq import decode_replay_warning

    return f"{question}\n\nwarning: {decode_replay_warning(decode, 'would replay')}" if decode else question


class TopApp(App[None]):
    CSS_PATH = "top.tcss"
    TITLE = "tpx top"
    AUTO_FOCUS = "DataTable"  # never the (hidden) filter box
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit"),
        Binding("ctrl+c", "quit", "quit", show=False, priority=True),
        Binding("question_mark", "help", "help"),
        Binding("slash", "filter", "filter", show=False),  # the help says it: the footer fits 80 columns
        Binding("r", "replay", "replay"),
        Binding("R", "replay_all", "replay all", show=False),
        Binding("c", "claim", "claim"),
        Binding("h", "rehydrate", "rehydrate"),
        Binding("p", "pause", "pause"),
        Binding("w", "warnings", "warnings", show=False),
        Binding("escape", "clear_filter", "clear filter", show=False),
        *(Binding(str(n), f"tab('{t.TAB}')", show=False) for n, t in enumerate(TABLES, 1)),
    ]

    def __init__(
        self,
        settings: Settings,
        interval: float = 1.0,
        duration: float | None = None,
        poller: Poller | None = None,
        live: bool = True,
        clock: bool = True,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.interval = interval
        self.duration = duration
        self.poller = poller or Poller(settings)
        self.live = live  # False: show the first snapshot only (snapshot tests)
        self.snapshot = Snapshot()
        self.refreshes = 0
        self.clock = clock
        self.paused = False
        self._timer: Timer | None = None  # the one pending refresh: actions refresh too, never twice

    # --- layout ---

    def compose(self) -> ComposeResult:
        yield Header(show_clock=self.clock)
        yield Static("", id="banner")
        with Horizontal(id="overview"):
            yield Static("connecting…", id="stream-panel")
            with Vertical(id="rates"):
                yield Static("in: -", id="in-label")
                yield RateSparkline(id="in-spark")
                yield Static("out: -", id="out-label")
                yield RateSparkline(id="out-spark")
        yield Input(placeholder="filter (Esc clears)", id="filter")
        with TabbedContent(id="tabs"):
            for table in TABLES:
                with TabPane(table.TITLE, id=f"tab-{table.TAB}"):
                    yield Static("", id=f"{table.TAB}-note", classes="note", markup=False)
                    yield table()
        yield Footer()

    def on_mount(self) -> None:
        self._title()
        self.refresh_data()
        if self.duration:
            self.set_timer(self.duration, self.exit)

    # --- refresh ---

    @work(thread=True, exclusive=True, group="refresh")
    def refresh_data(self) -> None:
        snapshot = self.poller.poll()
        if not get_current_worker().is_cancelled:  # a newer refresh started: that one shows
            self.call_from_thread(self.show, snapshot)

    def _title(self) -> None:
        paused = "  — PAUSED (p resumes)" if self.paused else ""
        self.sub_title = f"{self.settings.stream} / {self.settings.group}{paused}"

    def show(self, snap: Snapshot) -> None:
        if self.paused:  # a poll that was under way when refresh was paused: the screen stays still
            return
        if not self.is_running:  # a poll that finished as the app closed: its widgets are gone
            return
        self.snapshot = snap
        self.refreshes += 1
        self._banner(snap)
        if snap.status is not None:
            self._overview(snap, snap.status)
        for table in self.query(SnapshotTable):
            table.show(snap)
            note = table.note(snap)
            line = self.query_one(f"#{table.TAB}-note", Static)
            line.update(note)
            line.set_class(bool(note), "shown")
        if self.live:
            if self._timer is not None:
                self._timer.stop()
            self._timer = self.set_timer(self.interval, self.refresh_data)

    def _banner(self, snap: Snapshot) -> None:
        banner = self.query_one("#banner", Static)
        problems = []
        if snap.redis_error:
            problems.append(f"Redis unreachable: {snap.redis_error} — retrying")
        if snap.postgres_error:
            problems.append(f"PostgreSQL unreachable: {snap.postgres_error} — retrying")
        for consumer in snap.status.consumers if snap.status else []:
            failing = consumer.failing
            if failing is not None:  # alive, but its writers are not writing: say why, up top
                problems.append(f"{consumer.name}: {WRITERS_FAILING} {ago(failing[0])}: {failing[1]}")
        banner.update("\n".join(problems))
        banner.set_class(bool(problems), "shown")

    def _overview(self, snap: Snapshot, st: Status) -> None:
        lag = lag_text(st.lag)
        newest = f", newest {ago(st.last_entry_age_s)}" if st.last_entry_id else ""
        oldest = f" (oldest {ago(st.oldest_pending_age_s)})" if st.oldest_pending_id else ""
        dead = st.dead_with_pending
        growth = f" ({snap.dlq_per_min:+,.0f}/min)" if snap.dlq_per_min else ""
        p50 = [i.e2e_p50_s for i in st.instances if i.e2e_p50_s is not None]
        p95 = [i.e2e_p95_s for i in st.instances if i.e2e_p95_s is not None]
        e2e = f"  latency p50 {max(p50):.2f}s p95 {max(p95):.2f}s" if p50 and p95 else ""
        lines = [
            f"stream {st.stream_length:,} entries{newest}"
            if st.stream_exists
            else "stream (not created yet)",
            f"lag {lag}  pending {st.pending:,}{oldest}",
            f"DLQ {st.dlq_length:,} dead letters{growth}",
            f"instances {len(st.instances)} alive{e2e}",
            timing_summary(snap),
            f"{DEAD_WITH_PENDING}: {', '.join(c.name for c in dead)}" if dead else "",
        ]
        self.query_one("#stream-panel", Static).update("\n".join(lines))
        self.query_one("#in-label", Static).update(f"in  {number(snap.in_per_s, ',.0f')}/s")
        self.query_one("#out-label", Static).update(f"out {snap.out_per_s:,.0f}/s")
        self.query_one("#in-spark", RateSparkline).data = snap.in_history
        self.query_one("#out-spark", RateSparkline).data = snap.out_history

    def _active(self) -> SnapshotTable[Any]:
        pane = self.query_one("#tabs", TabbedContent).active_pane
        assert pane is not None  # noqa: S101 -- the tabs are composed with the app, one is always active
        return pane.query_one(SnapshotTable)

    def _selected(self, kind: type[SnapshotTable[Any]]) -> str | None:
        """The selected row of the ``kind`` table, when that is the tab shown."""
        active = self._active()
        return active.selected if isinstance(active, kind) else None

    # --- interaction ---

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        """Ctrl+P: Textual's own commands, then every tpx action by name (each still asks first)."""
        yield from super().get_system_commands(screen)
        yield SystemCommand("Replay dead letter", "replay the selected dead letter", self.action_replay)
        yield SystemCommand(
            "Replay all dead letters",
            "replay every dead letter (asks with the count)",
            self.action_replay_all,
        )
        yield SystemCommand(
            "Claim dead consumer", "claim the selected dead consumer's entries", self.action_claim
        )
        yield SystemCommand(
            "Rehydrate device", "drop and reseed the selected device's state", self.action_rehydrate
        )
        yield SystemCommand(
            "Recent warnings", "the selected instance's last warnings and errors", self.action_warnings
        )
        yield SystemCommand(
            "Resume refresh" if self.paused else "Pause refresh",
            "freeze the screen, or refresh again",
            self.action_pause,
        )
        for n, table in enumerate(TABLES, 1):
            yield SystemCommand(
                f"Show {table.TITLE.lower()}", f"tab {n}", partial(self.action_tab, table.TAB)
            )

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """While the filter box has focus, letters and digits are text, not commands."""
        commands = {
            "tab",
            "replay",
            "replay_all",
            "claim",
            "rehydrate",
            "help",
            "quit",
            "filter",
            "pause",
            "warnings",
        }
        return not (action in commands and isinstance(self.focused, Input))

    @on(DataTable.RowSelected, "LettersTable")
    def open_letter(self, event: DataTable.RowSelected) -> None:
        letter = self.query_one(LettersTable).letter(str(event.row_key.value))
        if letter is not None:
            self.push_screen(DetailScreen(f"dead letter {letter.id}", letter_detail(letter)))

    @on(DataTable.RowSelected, "InstancesTable")
    def open_instance(self, event: DataTable.RowSelected) -> None:
        self._show_instance(str(event.row_key.value))

    def action_warnings(self) -> None:
        name = self._selected(InstancesTable)
        if name is None:
            self.notify("select an instance first (tab 1)", severity="warning")
            return
        self._show_instance(name)

    def _show_instance(self, name: str) -> None:
        member = self.query_one(InstancesTable).member(name)
        if member is not None:
            body = instance_detail(member.name, member.state, member.instance)
            self.push_screen(DetailScreen(f"instance {name}", body))

    @on(DataTable.RowSelected, "DevicesTable")
    def select_device(self, event: DataTable.RowSelected) -> None:
        self.open_device(str(event.row_key.value))

    @on(DataTable.RowSelected, "TimingTable")
    def select_timing_record(self, event: DataTable.RowSelected) -> None:
        record = self.query_one(TimingTable).record(str(event.row_key.value))
        if record is not None:
            self.open_device(record.device_id)

    @work(thread=True, group="action")
    def open_device(self, device: str) -> None:
        from tpx.ops.control import newest_rows

        cached = next((d for d in self.snapshot.devices if d["device_id"] == device), {})
        try:
            rows = newest_rows(self.settings, device, DEVICE_ROWS_SHOWN)
        except Exception as exc:  # shown in the screen, never raised into the UI
            rows = []
            cached = {**cached, "error": first_line(exc)}
        timing = self.poller.device_timing(device, DEVICE_TIMING_SHOWN)
        body = device_detail(cached, rows, timing)
        self.call_from_thread(self.push_screen, DetailScreen(f"device {device}", body))

    def on_input_changed(self, event: Input.Changed) -> None:
        for table in self.query(SnapshotTable):
            table.filter(event.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._active().focus()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("shown")
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""  # Input.Changed clears every table's filter
        box.remove_class("shown")
        self._active().focus()

    def action_tab(self, tab: str) -> None:
        self.query_one("#tabs", TabbedContent).active = f"tab-{tab}"
        self._active().focus()

    def action_pause(self) -> None:
        """``p``: freeze the screen (rows stay put to read or select); again, refresh at once."""
        self.paused = not self.paused
        self._title()
        if self.paused and self._timer is not None:
            self._timer.stop()
        elif not self.paused:
            self.refresh_data()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def _confirm(self, question: str, then: Callable[[], object]) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                then()

        self.push_screen(ConfirmScreen(question), answered)

    def action_replay(self) -> None:
        entry_id = self._selected(LettersTable)
        if entry_id is None:
            self.notify("select a dead letter first (tab 3)", severity="warning")
            return
        letter = self.query_one(LettersTable).letter(entry_id)
        decode = 1 if letter is not None and letter.stage == STAGE_DECODE else 0
        self._confirm(
            _replay_question(f"Replay dead letter {entry_id} onto {self.settings.stream}?", decode),
            lambda: self.run_replay([entry_id]),
        )

    def action_replay_all(self) -> None:
        """``R``: every dead letter, not only the rows loaded (the DLQ may hold many more)."""
        self.plan_replay_all()

    @work(thread=True, exclusive=True, group="replay-plan")
    def plan_replay_all(self) -> None:
        """Count every dead letter off the UI thread, then ask with the counts."""
        from tpx.ops import dlq

        try:
            plan = dlq.replay_plan(self.poller.redis(), self.settings)
        except Exception as exc:  # reported, never raised into the UI
            self.call_from_thread(self.notify, f"replay failed: {first_line(exc)}", severity="error")
            return
        if not plan.ids:
            self.call_from_thread(self.notify, "no dead letters", severity="warning")
            return
        question = f"Replay all {len(plan.ids):,} dead letters onto {self.settings.stream}?"
        self.call_from_thread(
            self._confirm, _replay_question(question, plan.decode), lambda: self.run_replay(plan.ids)
        )

    @work(thread=True, group="action")
    def run_replay(self, ids: list[str]) -> None:
        from tpx.ops import dlq

        try:
            results = dlq.replay(self.poller.redis(), self.settings, ids)
        except Exception as exc:  # reported, never raised into the UI
            self.call_from_thread(self.notify, f"replay failed: {exc}", severity="error")
            return
        done = sum(1 for r in results if r.outcome == "replayed")
        self.call_from_thread(self.notify, f"replayed {done} of {len(ids)} dead letters")
        self.call_from_thread(self.refresh_data)

    def action_claim(self) -> None:
        consumer = self._selected(InstancesTable)
        st = self.snapshot.status
        view = next((c for c in st.consumers if c.name == consumer), None) if st and consumer else None
        if view is None:
            self.notify("select a consumer first (tab 1)", severity="warning")
            return
        if view.alive:
            self.notify(
                f"{consumer} is alive: its entries are in flight, nothing to claim", severity="warning"
            )
            return
        self._confirm(
            f"Claim the {view.pending:,} pending entries of {consumer} and remove it from the group?",
            lambda: self.run_claim(view.name),
        )

    @work(thread=True, group="action")
    def run_claim(self, consumer: str) -> None:
        from tpx.ops.claim import claim_dead_consumer

        try:
            report = claim_dead_consumer(self.poller.redis(), self.settings, consumer)
        except Exception as exc:  # reported, never raised into the UI
            self.call_from_thread(self.notify, f"claim failed: {exc}", severity="error")
            return
        self.call_from_thread(
            self.notify,
            f"claimed {report.claimed:,} entries of {consumer}: "
            f"{report.written:,} written, {report.dead_lettered:,} dead-lettered",
        )
        self.call_from_thread(self.refresh_data)

    def action_rehydrate(self) -> None:
        device = self._selected(DevicesTable)
        if device is None:
            self.notify("select a device first (tab 4)", severity="warning")
            return
        self._confirm(
            f"Make every instance drop and reseed the state of {device}?", lambda: self.run_rehydrate(device)
        )

    @work(thread=True, group="action")
    def run_rehydrate(self, device: str) -> None:
        from tpx.ops.control import rehydrate

        try:
            result = rehydrate(self.poller.redis(), self.settings, device)
        except Exception as exc:  # reported, never raised into the UI
            self.call_from_thread(self.notify, f"rehydrate failed: {exc}", severity="error")
            return
        who = ", ".join(result.confirmed) or "no instance"
        silent = f"; no answer from {', '.join(result.silent)}" if result.silent else ""
        self.call_from_thread(self.notify, f"rehydrate {device}: confirmed by {who}{silent}")
