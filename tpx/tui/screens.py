"""The dashboard's modal screens: confirmation, details, help."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from tpx.format import local_time, local_zone
from tpx.ops.dlq import DeadLetterView
from tpx.ops.inspect import Instance
from tpx.ops.timing import DeviceTiming, Inside


class ConfirmScreen(ModalScreen[bool]):
    """Every action asks first. Enter/y confirms, Escape/n cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "yes"),
        Binding("n,escape", "answer(False)", "no"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(self.question, id="question")
            with Horizontal():
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class DetailScreen(ModalScreen[None]):
    """A dead letter with its full payload, or a device with its recent positions."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,enter", "dismiss", "close")]

    def __init__(self, title: str, body: str) -> None:
        super().__init__()
        self.title_text = title
        self.body = body

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="detail"):
            yield Static(f"[b]{self.title_text}[/b]  (Esc to close)")
            yield Static(self.body, markup=False, id="detail-body")


#: Epoch fields of the documents a detail view shows, by unit (per second): names ending in
#: ``_us``/``_ms``, and the contract's and the state's own names.
EPOCH_SUFFIXES = {"_us": 1_000_000, "_ms": 1_000}
EPOCH_NAMES = {"ts": 1_000, "received_at": 1_000, "last_seen": 1, "started_at": 1, "at": 1}


def iso_utc(seconds: float) -> str:
    """Epoch seconds as ISO 8601 UTC with milliseconds, ``2026-12-01T09:30:28.604Z``."""
    return (
        dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def _per_second(name: str) -> int | None:
    unit = EPOCH_NAMES.get(name)
    return unit or next((u for suffix, u in EPOCH_SUFFIXES.items() if name.endswith(suffix)), None)


def with_times(doc: Any) -> Any:
    """``doc`` with every epoch number shown as a time, the raw value after it:
    ``"last_ts_us": "2026-12-01T09:30:28.604Z (1796105228604000)"`` (numbers in strings too)."""
    if isinstance(doc, list):
        return [with_times(v) for v in doc]
    if not isinstance(doc, dict):
        return doc
    out: dict[str, Any] = {}
    for name, value in doc.items():
        unit = _per_second(str(name))
        raw = value if isinstance(value, int | float) and not isinstance(value, bool) else None
        if raw is None and isinstance(value, str) and value.isdigit():
            raw = int(value)
        if unit is not None and raw is not None and raw > 0:
            try:
                out[name] = f"{iso_utc(raw / unit)} ({value})"
                continue
            except (OverflowError, OSError, ValueError):  # not a time after all: shown as it is
                pass
        out[name] = with_times(value)
    return out


def letter_detail(letter: DeadLetterView) -> str:
    """A dead letter's fields, then its original record pretty-printed (or as it came, if not JSON)."""
    body = json.dumps(with_times(letter.to_dict()), indent=2)
    original = letter.fields.get("record")
    if original:
        try:
            body += "\n\nrecord:\n" + json.dumps(with_times(json.loads(original)), indent=2)
        except ValueError:
            body += "\n\nrecord (not JSON):\n" + original
    return body


def _inside_name(inside: Inside) -> str:
    return inside.name if inside.name is not None else f"#{inside.id} (deleted)"


def membership_lines(timing: DeviceTiming | str) -> list[str]:
    """The geofences a device is inside now, then its newest timing records (or why not)."""
    if isinstance(timing, str):
        return [f"geofences inside now: unknown ({timing})"]
    if not timing.seen:
        inside = "none (the domain has not seen this device yet)"
    elif timing.state_error:
        inside = f"unknown ({timing.state_error})"
    else:
        inside = ", ".join(_inside_name(i) for i in timing.inside) or "none"
    lines = [f"geofences inside now: {inside}"]
    if not timing.records:
        return [*lines, "timing records: none yet"]
    lines.append(f"timing records (newest first, {local_zone()}):")
    for r in timing.records:
        name = r.geofence_name if r.geofence_name is not None else f"#{r.geofence} (deleted)"
        lines.append(f"  {local_time(r.ts)}  {r.event:<5}  {name}")
    return lines


def device_detail(
    cached: dict[str, Any], rows: list[dict[str, Any]], timing: DeviceTiming | str | None = None
) -> str:
    """A device's cached state, its membership and timing records (``tpx.ops.timing``), then its
    recent positions (``tpx.ops.control.newest_rows``)."""
    lines = [json.dumps(with_times(cached), indent=2, default=str), ""]
    if timing is not None:
        lines += [*membership_lines(timing), ""]
    lines.append("recent positions:")
    lines += [
        f"  {r['ts']}  {r['latitude']:.5f}, {r['longitude']:.5f}  speed {r['speed']}  "
        f"sats {r['satellites']}  valid {r['valid']}"
        for r in rows
    ]
    return "\n".join(lines)


#: The keys, one per row, each row short enough for an 80-column terminal (the list scrolls).
def instance_detail(name: str, state: str, instance: Instance | None) -> str:
    """A group member: its state, its heartbeat's facts, then its recent warnings, as k9s shows a
    pod's log (the heartbeat carries them: ``tpx.logs.RECENT_WARNINGS`` lines, secrets masked)."""
    if instance is None:
        return f"{name}: {state}\n\nno heartbeat: no instance runs under this name, nothing to show."
    failing = ", ".join(instance.writers_failing) or "none"
    lines = [
        f"{name}: {state}",
        f"host {instance.host}  pid {instance.pid}  version {instance.version}",
        f"started {iso_utc(instance.started_at)}  heartbeat {instance.heartbeat_age_s:.0f}s ago",
        f"writers failing: {failing}",
        "",
    ]
    if "recent_warnings" not in instance.raw:
        return "\n".join([*lines, "recent warnings: not reported (this instance's tpx is older)"])
    warnings = [str(w) for w in instance.raw["recent_warnings"]]
    lines.append(f"recent warnings ({len(warnings)}, oldest first):" if warnings else "no recent warnings")
    return "\n".join(lines + [f"  {w}" for w in warnings])


HELP_KEYS: tuple[tuple[str, str], ...] = (
    ("Tab, Shift+Tab", "move between panels"),
    ("1-5", "jump to a tab: instances, pending, letters, devices, timing"),
    ("/", "filter the table (Esc clears)"),
    ("Enter", "open the selected dead letter, device or instance"),
    ("Enter on timing", "open the record's device: its geofences, its records"),
    ("w", "the selected instance's recent warnings"),
    ("r", "replay the selected dead letter"),
    ("R", "replay all dead letters (asks with the count)"),
    ("c", "claim the selected dead consumer's entries"),
    ("h", "force-rehydrate the selected device"),
    ("s", "sort by the next column"),
    ("S", "reverse the order"),
    ("click a header", "sort by that column (again: reverse)"),
    ("p", "pause refresh (header: PAUSED); again resumes"),
    ("Ctrl+P", "command palette: every action by name"),
    ("?", "this help"),
    ("q", "quit"),
)
#: Width of the keys column in the help.
HELP_KEY_WIDTH = 16

HELP_FOOTNOTES = """\
Every action asks for confirmation and reports its result. States are
spelled out (alive, DEAD, HAS PENDING, valid, no fix) so it reads
without colour. A lag marked (est.) was counted by tpx: Redis before
7.0 reports none (≈: counted, ≥: at least that many). Timing records
show in this machine's time zone (named above them); other times UTC.
"""


def help_text() -> str:
    rows = "\n".join(f"  {key:<{HELP_KEY_WIDTH}} {what}" for key, what in HELP_KEYS)
    return f"tpx top — the pipeline at a glance\n\n{rows}\n\n{HELP_FOOTNOTES.rstrip()}"


class HelpScreen(ModalScreen[None]):
    """The keys, in a box that fits them (and scrolls on a small terminal)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,question_mark", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static(help_text(), markup=False, id="help-body")
