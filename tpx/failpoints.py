"""Fail points: named places where a test can make tpx fail on purpose.

``TPX_FAILPOINTS=writer.commit`` (comma-separated names) makes the code at that
point raise :class:`FailPointError`, which is deliberately *not* one of the
errors the engine handles: it crashes the thread, exactly like a bug would, so
the crash path (panic dump, exit code 70) can be tested against a real
process. Never set it in production. Checking costs one set lookup.
"""

from __future__ import annotations

import os

_ACTIVE = frozenset(filter(None, (os.environ.get("TPX_FAILPOINTS") or "").split(",")))


class FailPointError(RuntimeError):
    """Raised at an armed fail point."""


def failpoint(name: str) -> None:
    if name in _ACTIVE:
        raise FailPointError(f"fail point {name} triggered (TPX_FAILPOINTS)")
