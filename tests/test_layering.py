"""docs/DESIGN.md's layout is an import order: a package of rexrag_fast imports only those above it.

The order is read from the design document itself, so changing one without the other fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def design_order() -> list[str]:
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    order = ["kernels"]
    for line in block.splitlines():
        m = re.match(r"^  (\w+)/\s", line)
        if m:
            order.append(m.group(1))
    return order


def imported_modules(path: Path) -> set[str]:
    mods: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
    return mods


def test_design_lists_every_package() -> None:
    order = design_order()
    packages = {p.name for p in (ROOT / "rexrag_fast").iterdir() if (p / "__init__.py").is_file()}
    assert packages | {"kernels"} == set(order), f"DESIGN.md layout {order} vs packages {sorted(packages)}"


def test_packages_import_only_layers_above_them() -> None:
    order = design_order()
    rank = {name: i for i, name in enumerate(order)}
    problems = []
    for path in sorted((ROOT / "rexrag_fast").rglob("*.py")):
        rel = path.relative_to(ROOT / "rexrag_fast")
        if len(rel.parts) < 2 or rel.parts[0] not in rank or path.stem.endswith("_command"):
            continue
        own = rank[rel.parts[0]]
        for mod in imported_modules(path):
            parts = mod.split(".")
            if parts[0] != "rexrag_fast" or len(parts) < 2 or parts[1] not in rank:
                continue
            if rank[parts[1]] > own:
                problems.append(f"{rel} imports {mod} (layer {parts[1]} is below {rel.parts[0]})")
    assert not problems, "\n".join(problems)


def test_kernels_do_not_import_rexrag_fast() -> None:
    offenders = [p.name for p in (ROOT / "kernels").glob("*.py")
                 if any(m.split(".")[0] == "rexrag_fast" for m in imported_modules(p))]
    assert not offenders
