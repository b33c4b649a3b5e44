"""The `tpx` command line (:mod:`tpx.cli.app`); ``tpx = "tpx.cli:main"`` is the console script."""

from tpx.cli.app import app, main

__all__ = ["app", "main"]
