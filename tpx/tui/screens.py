"""The dashboard's modal screens: confirmation, details, help."""

from __future__ import annotations

import json
from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from tpx.ops.dlq import DeadLetterView


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


def letter_detail(letter: DeadLetterView) -> str:
    """A dead letter's fields, then its original record pretty-printed (or as it came, if not JSON)."""
    body = json.dumps(letter.to_dict(), indent=2)
    original = letter.fields.get("record")
    if original:
        try:
            body += "\n\nrecord:\n" + json.dumps(json.loads(original), indent=2)
        except ValueError:
            body += "\n\nrecord (not JSON):\n" + original
    return body


def device_detail(cached: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """A device's cached state, then its recent positions (``tpx.ops.control.newest_rows``)."""
    lines = [json.dumps(cached, indent=2, default=str), "", "recent positions:"]
    lines += [
        f"  {r['ts']}  {r['latitude']:.5f}, {r['longitude']:.5f}  speed {r['speed']}  "
        f"sats {r['satellites']}  valid {r['valid']}"
        for r in rows
    ]
    return "\n".join(lines)


HELP = """\
tpx top — the pipeline at a glance (refreshes every --interval seconds)

  Tab / Shift+Tab   move between panels        1-4   jump to a tab
  /                 filter the table (Esc clears)
  Enter             open the selected dead letter or device
  r                 replay the selected dead letter       R   replay all dead letters
  c                 claim the selected dead consumer's entries
  h                 force-rehydrate the selected device
  s                 sort by the next column               S   reverse the order
  click a header    sort by that column (again: reverse)
  ?                 this help                             q   quit

Every action asks for confirmation and reports its result. States are spelled
out (alive, DEAD, HAS PENDING, valid, no fix) so it reads without colour.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,question_mark", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(HELP, markup=False)
