"""`tpx top`: the live dashboard an operator keeps open.

Refreshes run in a worker thread (:class:`~tpx.tui.data.Collector`) and
re-arm a timer when they finish, so polls never overlap and the UI thread
never waits on Redis or Postgres. Actions (replay, claim, rehydrate) ask for
confirmation, run in worker threads too, and report with a notification.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, ClassVar

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header, Input, Sparkline, Static, TabbedContent, TabPane

from tpx.config import Settings
from tpx.errors import first_line
from tpx.format import DEAD_WITH_PENDING, ago
from tpx.ops.render import CONSUMER_COLUMNS, consumer_cells
from tpx.tui.data import Collector, Snapshot
from tpx.tui.screens import ConfirmScreen, DetailScreen, HelpScreen

TABS = ("instances", "pending", "letters", "devices")

COLUMNS: dict[str, tuple[str, ...]] = {
    "instances": CONSUMER_COLUMNS,
    "pending": ("id", "consumer", "idle", "deliveries", "age"),
    "letters": ("id", "stage", "device", "deliveries", "replays", "age", "error"),
    "devices": ("device", "last fix", "age", "lat", "lon", "speed", "valid", "records", "dups", "late", "by"),
}


Row = tuple[str, tuple[str, ...]]


def _fix_time(us: int | None) -> str:
    if not us:
        return "-"
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).strftime("%m-%d %H:%M:%S")


def _num(value: Any, fmt: str = "{:,}") -> str:
    return "-" if value is None else fmt.format(value)


class TopApp(App[None]):
    CSS_PATH = "top.tcss"
    TITLE = "tpx top"
    AUTO_FOCUS = "DataTable"  # never the (hidden) filter box
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit"),
        Binding("ctrl+c", "quit", "quit", show=False, priority=True),
        Binding("question_mark", "help", "help"),
        Binding("slash", "filter", "filter"),
        Binding("r", "replay", "replay"),
        Binding("R", "replay_all", "replay all", show=False),
        Binding("c", "claim", "claim"),
        Binding("h", "rehydrate", "rehydrate"),
        Binding("escape", "clear_filter", "clear filter", show=False),
        Binding("1", "tab('instances')", show=False),
        Binding("2", "tab('pending')", show=False),
        Binding("3", "tab('letters')", show=False),
        Binding("4", "tab('devices')", show=False),
    ]

    def __init__(
        self,
        settings: Settings,
        interval: float = 1.0,
        duration: float | None = None,
        collector: Collector | None = None,
        live: bool = True,
        clock: bool = True,
    ) -> None:
        super().__init__()
        self.s = settings
        self.interval = interval
        self.duration = duration
        self.collector = collector or Collector(settings)
        self.live = live  # False: show the first snapshot only (snapshot tests)
        self.snapshot = Snapshot()
        self.filter_text = ""
        self.sort: dict[str, tuple[int, bool]] = {}
        self.refreshes = 0
        self.clock = clock

    # --- layout ---

    def compose(self) -> ComposeResult:
        yield Header(show_clock=self.clock)
        yield Static("", id="banner")
        with Horizontal(id="overview"):
            yield Static("connecting…", id="stream-panel")
            with Vertical(id="rates"):
                yield Static("in: -", id="in-label")
                yield Sparkline([], id="in-spark")
                yield Static("out: -", id="out-label")
                yield Sparkline([], id="out-spark")
        yield Input(placeholder="filter (Esc clears)", id="filter")
        with TabbedContent(id="tabs"):
            for tab, label in zip(TABS, ("Instances", "Pending", "Dead letters", "Devices"), strict=True):
                with TabPane(label, id=f"tab-{tab}"):
                    yield DataTable(id=tab, cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"{self.s.stream} / {self.s.group}"
        for tab in TABS:
            table = self.query_one(f"#{tab}", DataTable)
            for column in COLUMNS[tab]:
                table.add_column(column, key=column)
        self.refresh_data()
        if self.duration:
            self.set_timer(self.duration, self.exit)

    # --- refresh ---

    @work(thread=True, exclusive=True, group="refresh")
    def refresh_data(self) -> None:
        snapshot = self.collector.collect()
        self.call_from_thread(self.show, snapshot)

    def show(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self.refreshes += 1
        self._banner(snap)
        if snap.status is not None:
            self._overview(snap)
        self._fill_tables()
        if self.live:
            self.set_timer(self.interval, self.refresh_data)

    def _banner(self, snap: Snapshot) -> None:
        banner = self.query_one("#banner", Static)
        problems = []
        if snap.redis_error:
            problems.append(f"Redis unreachable: {snap.redis_error} — retrying")
        if snap.postgres_error:
            problems.append(f"PostgreSQL unreachable: {snap.postgres_error} — retrying")
        banner.update("\n".join(problems))
        banner.set_class(bool(problems), "shown")

    def _overview(self, snap: Snapshot) -> None:
        st = snap.status
        assert st is not None  # noqa: S101
        lag = "unknown" if st.lag is None else f"{st.lag:,}"
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
            f"{DEAD_WITH_PENDING}: {', '.join(c.name for c in dead)}" if dead else "",
        ]
        self.query_one("#stream-panel", Static).update("\n".join(lines))
        self.query_one("#in-label", Static).update(f"in  {_num(snap.in_per_s, '{:,.0f}')}/s")
        self.query_one("#out-label", Static).update(f"out {snap.out_per_s:,.0f}/s")
        self.query_one("#in-spark", Sparkline).data = list(self.collector.in_history)
        self.query_one("#out-spark", Sparkline).data = list(self.collector.out_history)

    def _rows(self, tab: str) -> list[Row]:
        snap = self.snapshot
        st = snap.status
        rows: list[Row] = []
        if tab == "instances" and st is not None:
            for c in st.consumers:
                rows.append((c.name, consumer_cells(c)))
            known = {c.name for c in st.consumers}
            for i in st.instances:
                if i.consumer not in known:
                    rows.append(
                        (
                            i.consumer,
                            (
                                i.consumer,
                                "starting",
                                "0",
                                "-",
                                f"{i.read_per_s:,.0f}",
                                f"{i.written_per_s:,.0f}",
                                str(i.queue_depth),
                                f"{i.cache_size:,}",
                            ),
                        )
                    )
            return rows
        if tab == "pending":
            return [
                (p.id, (p.id, p.consumer, ago(p.idle_ms / 1000), str(p.deliveries), ago(p.age_s)))
                for p in snap.oldest_pending
            ]
        if tab == "letters":
            return [
                (x.id, (x.id, x.stage, x.device_id, str(x.deliveries), str(x.replays), ago(x.age_s), x.error))
                for x in snap.letters
            ]
        if tab == "devices":
            now_us = dt.datetime.now(dt.UTC).timestamp() * 1e6
            for d in snap.devices:
                last = d.get("last_ts_us")
                valid = d.get("valid")
                rows.append(
                    (
                        d["device_id"],
                        (
                            d["device_id"],
                            _fix_time(last),
                            ago((now_us - last) / 1e6) if last else "-",
                            _num(d.get("latitude"), "{:.5f}"),
                            _num(d.get("longitude"), "{:.5f}"),
                            _num(d.get("speed"), "{:.1f}"),
                            "-" if valid is None else ("valid" if valid else "no fix"),
                            _num(d.get("records")),
                            _num(d.get("duplicates")),
                            _num(d.get("out_of_order")),
                            str(d.get("consumer") or snap.devices_from),
                        ),
                    )
                )
            return rows
        return rows

    def _fill_tables(self) -> None:
        needle = self.filter_text.lower()
        for tab in TABS:
            table = self.query_one(f"#{tab}", DataTable)
            selected = self._selected_key(table)
            rows = self._rows(tab)
            if needle:
                rows = [r for r in rows if any(needle in cell.lower() for cell in r[1])]
            if tab in self.sort:
                index, reverse = self.sort[tab]

                def by_column(row: Row, i: int = index) -> tuple[int, float, str]:
                    return _sort_key(row[1][i])

                rows.sort(key=by_column, reverse=reverse)
            table.clear()
            for key, cells in rows:
                table.add_row(*cells, key=key)
            if selected is not None and selected in {k for k, _ in rows}:
                table.move_cursor(row=table.get_row_index(selected))

    @staticmethod
    def _selected_key(table: DataTable[Any]) -> str | None:
        if table.row_count == 0:
            return None
        try:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        except Exception:  # no valid cursor yet
            return None
        return None if key.value is None else str(key.value)

    def _active(self) -> str:
        active = self.query_one("#tabs", TabbedContent).active
        return active.removeprefix("tab-")

    def _selected(self, tab: str) -> str | None:
        return self._selected_key(self.query_one(f"#{tab}", DataTable))

    # --- interaction ---

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """While the filter box has focus, letters and digits are text, not commands."""
        commands = {"tab", "replay", "replay_all", "claim", "rehydrate", "help", "quit", "filter"}
        return not (action in commands and isinstance(self.focused, Input))

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        tab = event.data_table.id or ""
        index = event.column_index
        current = self.sort.get(tab)
        self.sort[tab] = (index, not current[1] if current and current[0] == index else False)
        self._fill_tables()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        tab = event.data_table.id
        key = None if event.row_key.value is None else str(event.row_key.value)
        if tab == "letters" and key:
            letter = next((x for x in self.snapshot.letters if x.id == key), None)
            if letter is not None:
                body = json.dumps(letter.to_dict(), indent=2)
                original = letter.fields.get("record")
                if original:
                    try:
                        body += "\n\nrecord:\n" + json.dumps(json.loads(original), indent=2)
                    except ValueError:
                        body += "\n\nrecord (not JSON):\n" + original
                self.push_screen(DetailScreen(f"dead letter {key}", body))
        elif tab == "devices" and key:
            self.open_device(key)

    @work(thread=True, group="action")
    def open_device(self, device: str) -> None:
        from tpx.ops.control import newest_rows

        cached = next((d for d in self.snapshot.devices if d["device_id"] == device), {})
        try:
            rows = newest_rows(self.s, device, 20)
        except Exception as exc:  # shown in the screen, never raised into the UI
            rows = []
            cached = {**cached, "error": first_line(exc)}
        lines = [json.dumps(cached, indent=2, default=str), "", "recent positions:"]
        lines += [
            f"  {r['ts']}  {r['latitude']:.5f}, {r['longitude']:.5f}  speed {r['speed']}  "
            f"sats {r['satellites']}  valid {r['valid']}"
            for r in rows
        ]
        self.call_from_thread(self.push_screen, DetailScreen(f"device {device}", "\n".join(lines)))

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value
        self._fill_tables()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one(f"#{self._active()}", DataTable).focus()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("shown")
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.remove_class("shown")
        self.filter_text = ""
        self._fill_tables()
        self.query_one(f"#{self._active()}", DataTable).focus()

    def action_tab(self, tab: str) -> None:
        self.query_one("#tabs", TabbedContent).active = f"tab-{tab}"
        self.query_one(f"#{tab}", DataTable).focus()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def _confirm(self, question: str, then: Any) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                then()

        self.push_screen(ConfirmScreen(question), answered)

    def action_replay(self) -> None:
        entry_id = self._selected("letters") if self._active() == "letters" else None
        if entry_id is None:
            self.notify("select a dead letter first (tab 3)", severity="warning")
            return
        self._confirm(
            f"Replay dead letter {entry_id} onto {self.s.stream}?", lambda: self.run_replay([entry_id])
        )

    def action_replay_all(self) -> None:
        ids = [x.id for x in self.snapshot.letters]
        if not ids:
            self.notify("no dead letters", severity="warning")
            return
        self._confirm(
            f"Replay all {len(ids)} dead letters shown onto {self.s.stream}?", lambda: self.run_replay(ids)
        )

    @work(thread=True, group="action")
    def run_replay(self, ids: list[str]) -> None:
        from tpx.ops import dlq

        try:
            client = self.collector._redis()
            results = dlq.replay(client, self.s, ids)
        except Exception as exc:  # reported, never raised into the UI
            self.call_from_thread(self.notify, f"replay failed: {exc}", severity="error")
            return
        done = sum(1 for r in results if r.outcome == "replayed")
        self.call_from_thread(self.notify, f"replayed {done} of {len(ids)} dead letters")
        self.call_from_thread(self.refresh_data)

    def action_claim(self) -> None:
        consumer = self._selected("instances") if self._active() == "instances" else None
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
            report = claim_dead_consumer(self.collector._redis(), self.s, consumer)
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
        device = self._selected("devices") if self._active() == "devices" else None
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
            result = rehydrate(self.collector._redis(), self.s, device)
        except Exception as exc:  # reported, never raised into the UI
            self.call_from_thread(self.notify, f"rehydrate failed: {exc}", severity="error")
            return
        who = ", ".join(result.confirmed) or "no instance"
        silent = f"; no answer from {', '.join(result.silent)}" if result.silent else ""
        self.call_from_thread(self.notify, f"rehydrate {device}: confirmed by {who}{silent}")


def _sort_key(cell: str) -> tuple[int, float, str]:
    cleaned = cell.replace(",", "")
    try:
        return (0, float(cleaned), "")
    except ValueError:
        return (1, 0.0, cell)
