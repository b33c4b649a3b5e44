"""The command line's layering, checked: `tpx --help` loads no engine, and tpx/ops holds no CLI code.

`tpx --help` (and each command's ``--help``) runs in a fresh interpreter, which then reports the
modules it loaded: none of the engine (`tpx.engine.*`), psycopg_pool or prometheus_client may be
among them, as none is needed to print help. And the ops functions return data: no module under
``tpx/ops/`` imports typer or rich, at its top or inside a function.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tpx

#: The tree the tests import (the subprocess must load the same one).
ROOT = Path(tpx.__file__).resolve().parent.parent
#: Module name prefixes `tpx --help` has no business loading.
HEAVY = ("tpx.engine", "psycopg_pool", "prometheus_client")

#: Run the command line as `python -m tpx` does, then print the loaded modules as JSON on stderr.
PROBE = """
import json, runpy, sys
sys.argv = ["tpx", *sys.argv[1:]]
try:
    runpy.run_module("tpx", run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
sys.stderr.write("\\nMODULES " + json.dumps({"code": code, "modules": sorted(sys.modules)}) + "\\n")
"""


def loaded_by(*args: str) -> tuple[int, list[str], str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=60
    )
    line = next(x for x in run.stderr.splitlines() if x.startswith("MODULES "))
    report = json.loads(line.removeprefix("MODULES "))
    return report["code"], report["modules"], run.stdout


@pytest.mark.parametrize(
    "args",
    [("--help",), ("serve", "--help"), ("status", "--help"), ("claim", "--help"), ("dlq", "list", "--help")],
    ids=" ".join,
)
def test_help_loads_no_engine_pool_or_metrics(args: tuple[str, ...]) -> None:
    code, modules, out = loaded_by(*args)
    assert code == 0 and "Usage:" in out
    assert "tpx.cli" in modules  # the probe ran the real command line
    heavy = [m for m in modules if m.startswith(HEAVY)]
    assert heavy == [], f"`tpx {' '.join(args)}` loaded {heavy}"


def _imported(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_ops_modules_import_neither_typer_nor_rich() -> None:
    sources = sorted((ROOT / "tpx" / "ops").glob("*.py"))
    assert sources, "tpx/ops has modules"
    found = {
        path.name: sorted(_imported(ast.parse(path.read_text())) & {"typer", "rich", "click"})
        for path in sources
    }
    assert {name: mods for name, mods in found.items() if mods} == {}
