"""The package's layout as CONTRIBUTING.md states it: imports follow the data flow, and there are no cycles."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "elmgen"
# Lowest first: a module may import from its own unit and from units of lower layers only.
LAYERS = [
    {"errors", "io", "config", "checkpoint", "device", "rng", "plots", "vocab", "schedules", "stats"},
    {"data"},
    {"tokenizers"},
    {"codes"},
    {"models"},
    {"hub"},
    {"sampling"},
    {"evaluation", "analysis"},
    {"train"},
    {"pipeline"},
    {"serve"},
    {"commands"},
    {"cli"},
]
LAYER = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The elmgen modules `name` imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "elmgen":
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "elmgen"}
    return found - {name}


def unit(name: str) -> str:
    return name.split(".")[1] if "." in name else ""


def test_imports_follow_the_layers():
    wrong = [
        f"{a} imports {b}"
        for a in MODULES
        if a != "elmgen"
        for b in imports(a)
        if b != "elmgen"
        and unit(b) != unit(a)
        and not (LAYER[unit(b)] < LAYER[unit(a)] or LAYER[unit(a)] == 0 == LAYER[unit(b)])
    ]
    assert not wrong, wrong
    assert set(LAYER) == {unit(m) for m in MODULES if m != "elmgen"}  # every unit has its layer


def test_no_import_cycles():
    graph = {name: imports(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in graph.get(name, ()):
            assert state.get(dep) != 1, " -> ".join(path + [name, dep])
            if dep not in state:
                visit(dep, path + [name])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [])
