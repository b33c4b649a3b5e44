"""`tpx simulate` on a terminal: a progress display redrawn in place, then one summary line.

The real command runs on a pseudo-terminal (stdin, stdout and stderr all the pty's, 160 columns),
as an operator runs it; the test reads every byte the terminal received. Its pipe counterpart is
tests/test_ops_pipes.py::test_simulate_into_a_pipe_ends_with_a_summary_line.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from tpx.config import Settings

COLUMNS, ROWS = 160, 40
#: rich's and other tools' switches that would change what a terminal gets: the test wants the
#: plain terminal path.
_TERMINAL_OVERRIDES = ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_on_a_terminal(env: dict[str, str], *args: str, timeout: float = 60) -> tuple[int, str]:
    """Run `tpx ARGS` with a pty as its terminal; its exit code and everything it wrote."""
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    full = {k: v for k, v in os.environ.items() if k not in _TERMINAL_OVERRIDES}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tpx", *args],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env={**full, "TERM": "xterm-256color", **env},
        close_fds=True,
    )
    os.close(secondary)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.2)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)
    return code, out.decode("utf-8", "replace")


@pytest.mark.timeout(90)
def test_simulate_on_a_terminal_redraws_its_progress_then_prints_a_summary(settings: Settings) -> None:
    env = {"TPX_REDIS_URL": settings.redis_url, "TPX_STREAM": settings.stream}
    code, out = run_on_a_terminal(env, "simulate", "--count", "1500", "--rate", "1000", "--devices", "5")
    assert code == 0, out

    # each update redraws the line in place: a carriage return before every frame, never two
    # frames run together on one line ("250 records  500/s500 records…")
    frames = [ANSI.sub("", f) for f in out.split("\r") if "publishing" in f]
    assert all(f.count("publishing") == 1 for f in frames), frames
    shown = [int(m.group(1).replace(",", "")) for f in frames if (m := re.search(r"([\d,]+) records", f))]
    assert len(set(shown)) >= 3 and shown == sorted(shown), shown  # a progress that moves forward
    assert any(re.search(r"[\d,]+ records +[\d,]+/s", f) for f in frames), frames  # with the rate
    assert "\x1b[2K" in out  # each redraw erases the line it replaces

    # the progress is cleared, then the summary: one line of its own, the last on the terminal
    lines = [line for line in ANSI.sub("", out).replace("\r\n", "\n").split("\n") if line.strip("\r ")]
    last = lines[-1].split("\r")[-1]
    assert re.fullmatch(
        rf"published 1,500 records to {re.escape(settings.stream)} in \d+\.\ds \([\d,]+/s\): "
        r"0 duplicates, 0 late, 0 poison",
        last.strip(),
    ), lines[-3:]
