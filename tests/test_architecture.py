"""docs/architecture.md is the package's map: every module stands in one layer of its tables, and an
import (at the top, inside a function, or under TYPE_CHECKING) only ever points down or within a layer."""

import ast
import re
import sys

from tests.helpers import ROOT

PACKAGE = ROOT / "smollm2"
LAYER_HEADING = re.compile(r"^## (\d+)\. ")
MODULE_ROW = re.compile(r"^\| `(\w+)\.py` \|")
OUTSIDE_THE_LAYERS = {"__init__", "__main__"}  # the package's front door and `python -m smollm2`


def documented_layers() -> dict[str, int]:
    layers: dict[str, int] = {}
    layer = None
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        if heading := LAYER_HEADING.match(line):
            layer = int(heading[1])
        elif (row := MODULE_ROW.match(line)) and layer is not None:
            assert row[1] not in layers, f"{row[1]}.py is in two layers of docs/architecture.md"
            layers[row[1]] = layer
    return layers


def imports_of(module: str) -> dict[str, int]:
    """The smollm2 modules `module` imports, each with the line of its first import."""
    found: dict[str, int] = {}
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "smollm2":
            parts = node.module.split(".")
            names = [parts[1]] if len(parts) > 1 else [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name.split(".")[1] for alias in node.names if alias.name.startswith("smollm2.")]
        for name in names:
            if name != module and (PACKAGE / f"{name}.py").exists():
                found.setdefault(name, node.lineno)
    return found


def test_every_module_stands_in_exactly_one_layer():
    modules = {path.stem for path in PACKAGE.glob("*.py")} - OUTSIDE_THE_LAYERS
    layers = documented_layers()
    assert sorted(modules - layers.keys()) == [], "modules docs/architecture.md does not place"
    assert sorted(layers.keys() - modules) == [], "docs/architecture.md places modules that do not exist"


def test_every_import_points_down_or_within_its_layer():
    layers = documented_layers()
    upward = [
        f"smollm2/{module}.py:{line} imports {target} (layer {layers[target]} above {layers[module]})"
        for module in layers
        for target, line in imports_of(module).items()
        if layers.get(target, -1) > layers[module]
    ]
    assert upward == []


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """A test that could never fail proves nothing: the same check over a made-up package with one upward import."""
    package = tmp_path / "smollm2"
    package.mkdir()
    (package / "low.py").write_text("def f():\n    from smollm2.high import g\n")
    (package / "high.py").write_text("from smollm2 import low\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    assert imports_of("low") == {"high": 2}
    assert imports_of("high") == {"low": 1}
    assert import_loops({"low": {"high"}, "high": {"low"}}) == ["high -> low -> high"]


def import_loops(graph: dict[str, set[str]]) -> list[str]:
    loops: list[str] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in path:
                loops.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in done:
                visit(target, [*path, target])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    return loops


def test_no_two_modules_import_each_other_in_a_loop():
    assert import_loops({module: set(imports_of(module)) for module in documented_layers()}) == []
