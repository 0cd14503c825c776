"""The package's layers, as ARCHITECTURE.md lists them: each module imports only modules listed before it.

The list in ARCHITECTURE.md's "Layers" block is the order; this test keeps the map and the code
in step (every module listed once, no import reaching up the list) and keeps modules short.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "visionlora"
MAX_LINES = 420  # "about 400": a module longer than this wants splitting


def layer_order() -> list[str]:
    """Module paths (``visionlora/...py``) in the order ARCHITECTURE.md's Layers block lists them."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = re.search(r"## Layers\n.*?```text\n(.*?)```", text, flags=re.S)
    assert block, "ARCHITECTURE.md has no '## Layers' section with a ```text block"
    return [line.split()[0] for line in block.group(1).splitlines() if line.startswith("visionlora/")]


def module_path(dotted: str) -> str | None:
    """``visionlora.io.formats`` -> ``visionlora/io/formats.py`` (a package: its ``__init__.py``)."""
    base = ROOT / dotted.replace(".", "/")
    if base.with_suffix(".py").is_file():
        return str(base.with_suffix(".py").relative_to(ROOT))
    if (base / "__init__.py").is_file():
        return str((base / "__init__.py").relative_to(ROOT))
    return None


def imported_modules(path: Path) -> set[str]:
    """The visionlora modules ``path`` imports, at the top or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from visionlora.io import formats`` imports a module; ``from visionlora.io import x`` the package
            names = [
                f"{node.module}.{a.name}" if module_path(f"{node.module}.{a.name}") else node.module for a in node.names
            ]
        else:
            continue
        found |= {p for n in names if n.startswith("visionlora") for p in [module_path(n)] if p}
    return found


def test_every_module_is_on_the_map_once():
    order = layer_order()
    on_disk = sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py"))
    assert len(order) == len(set(order)), [m for m in order if order.count(m) > 1]
    assert sorted(order) == on_disk, {"not on the map": set(on_disk) - set(order), "gone": set(order) - set(on_disk)}


def test_no_module_imports_one_above_it():
    order = layer_order()
    rank = {m: i for i, m in enumerate(order)}
    upward = [
        f"{module} imports {target}"
        for module in order
        for target in sorted(imported_modules(ROOT / module))
        if target != module and rank[target] > rank[module]
    ]
    assert not upward, upward


def test_modules_are_short_enough_to_read_in_one_sitting():
    long = {
        str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long
