"""Compatibility only: the dashboard's consumer cells now live in :mod:`tpx.format`.

The table rendering moved to :mod:`tpx.cli.render`. Delete this module once ``tpx/tui`` imports
``CONSUMER_COLUMNS`` and ``consumer_cells`` from :mod:`tpx.format` (or no longer needs them).
"""

from tpx.format import CONSUMER_COLUMNS, consumer_cells

__all__ = ["CONSUMER_COLUMNS", "consumer_cells"]
