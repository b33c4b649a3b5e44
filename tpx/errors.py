"""The error types an operator meets, and turning an exception into the one line they read.

Each one carries a one-line reason; the command line (:mod:`tpx.cli.options`) turns it into that
line on stderr and an exit code. :class:`tpx.config.ConfigError` stays beside the settings it
validates (it holds one line per invalid setting).
"""

from __future__ import annotations


class OpsError(Exception):
    """An operation refused or impossible, with a one-line reason for the operator."""


class DemoError(Exception):
    """The demo cannot start (one line for the user)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
