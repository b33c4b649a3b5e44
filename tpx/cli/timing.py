"""`tpx geofences`: the domain's commands (geofences and, later, timing records).

They read the CMS's tables (``TPX_GEOFENCES_TABLE``, ``TPX_TIMING_TABLE``) through
:mod:`tpx.ops.geofences`; a missing table or column is one line naming it and exit 2, as for
``tpx serve`` with ``TPX_DOMAIN=on``.
"""

from __future__ import annotations

from dataclasses import asdict

from tpx import exitcodes
from tpx.cli.options import POSTGRES_OPTIONS, Invocation, fail, with_settings


@with_settings(*POSTGRES_OPTIONS, json=True)
def geofences(cmd: Invocation) -> None:
    """Which geofences does tpx use? Each one's id, name, kind, active, and loaded or invalid (why).

    Example: TPX_GEOFENCES_TABLE=cms.geofences tpx geofences --json
    """
    from tpx.cli import render
    from tpx.domainstage.tables import TablesMissing
    from tpx.ops.geofences import list_geofences

    try:
        rows = cmd.guarded(lambda: list_geofences(cmd.settings))
    except TablesMissing as exc:
        fail(str(exc), exitcodes.USAGE)
    cmd.answer([asdict(r) for r in rows], lambda: render.print_geofences(rows, cmd.settings.geofences_table))
