"""The layers README's picture shows, checked: which package may import which.

Read from the source (every import, at a module's top or inside a function), so a new import
that crosses a layer fails here before it shows up as a slow `tpx --help` or a dashboard that
needs the engine.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tpx

PACKAGE = Path(tpx.__file__).resolve().parent

#: layer -> the tpx layers it must not import (the base, tpx/*.py, may be imported by all).
FORBIDDEN = {
    "base": ("tpx.engine", "tpx.ops", "tpx.cli", "tpx.tui", "tpx.domain", "tpx.domainstage"),
    "engine": ("tpx.ops", "tpx.cli", "tpx.tui", "tpx.domain", "tpx.domainstage"),
    "ops": ("tpx.cli", "tpx.tui"),
    "tui": ("tpx.cli", "tpx.engine"),
    "domain": ("tpx.engine", "tpx.ops", "tpx.cli", "tpx.tui"),
    "domainstage": ("tpx.ops", "tpx.cli", "tpx.tui"),
    "cli": ("tpx.tui.tables",),
}
#: The only engine modules the ops layer uses: `tpx claim` runs the engine's own two steps.
OPS_MAY_USE = {"tpx/ops/claim.py": ("tpx.engine",)}
#: The demo runs the engine and the dashboard together: it is a front end, not a base module.
FRONT_ENDS_AT_THE_TOP = {"demo.py", "simulate.py", "__main__.py"}


def layer_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    if len(relative.parts) == 1:
        return "cli" if relative.name in FRONT_ENDS_AT_THE_TOP else "base"
    return relative.parts[0]


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """The nodes under ``if TYPE_CHECKING:``: names for the type checker, never loaded."""
    hidden: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for child in node.body:
                hidden |= set(ast.walk(child))
    return hidden


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports when it runs (type-checking-only imports left out)."""
    found = set()
    tree = ast.parse(path.read_text())
    hidden = _type_checking_only(tree)
    for node in ast.walk(tree):
        if node in hidden:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_across_its_layer(path: Path) -> None:
    layer = layer_of(path)
    allowed = OPS_MAY_USE.get(str(path.relative_to(PACKAGE.parent)), ())
    crossing = sorted(
        name
        for name in imports(path)
        for banned in FORBIDDEN.get(layer, ())
        if (name == banned or name.startswith(banned + ".")) and not name.startswith(allowed or ("\0",))
    )
    assert not crossing, f"{path.relative_to(PACKAGE.parent)} ({layer}) imports {crossing}"
