"""The package's layering: no import circles, no vitconvert imports hidden inside functions, layers know no
method, and the wheel carries the recipes."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import vitconvert
from vitconvert.recipes import list_recipe_files

PACKAGE = Path(vitconvert.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """(vitconvert modules imported at module level, vitconvert imports made inside functions)."""
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    nested: list[str] = []
    known = {_module_name(p) for p in PACKAGE.rglob("*.py")}

    def targets(node: ast.Import | ast.ImportFrom) -> set[str]:
        if isinstance(node, ast.Import):
            return {a.name for a in node.names if a.name.startswith("vitconvert")}
        if not node.module or not node.module.startswith("vitconvert"):
            return set()
        out = set()
        for a in node.names:  # `from vitconvert import methods` imports the submodule
            sub = f"{node.module}.{a.name}"
            out.add(sub if sub in known else node.module)
        return out

    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            top |= targets(node)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom) and targets(inner):
                    nested.append(f"{path.name}:{inner.lineno}")
    return top, nested


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        deps, _ = _imports(path)
        # Importing a submodule runs its packages' __init__ first (the root package's too, but that one is
        # already running whenever a submodule is imported: only an explicit `import vitconvert` counts).
        expanded = {d for d in deps if d == "vitconvert"}
        for d in deps:
            parts = d.split(".")
            expanded |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
        graph[name] = {d for d in expanded if d != name and (d == "vitconvert" or not name.startswith(d + "."))}
    return graph


def test_no_import_circles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep):], dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    # (a module that imports the package itself, `import vitconvert`, would close a circle through its
    # __init__, which imports every module: the search above reports it)


def test_no_vitconvert_imports_inside_functions() -> None:
    nested = [n for p in PACKAGE.rglob("*.py") for n in _imports(p)[1]]
    assert nested == []


def test_layers_and_registry_know_no_method() -> None:
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("vitconvert.layers") or name in ("vitconvert.registry", "vitconvert.operating",
                                                             "vitconvert.errors"):
            assert not any(d.startswith("vitconvert.methods") for d in deps), (name, deps)
    assert graph["vitconvert.registry"] <= {"vitconvert.errors"}


@pytest.mark.slow
def test_wheel_carries_recipes_and_layers(tmp_path: Path) -> None:
    root = PACKAGE.parent
    if not (root / "pyproject.toml").is_file():
        pytest.skip("not a source checkout")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(root)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("vitconvert-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in list_recipe_files():
        assert f"vitconvert/builtin_recipes/{recipe.name}" in names
    assert {"vitconvert/layers/cascade.py", "vitconvert/layers/costs.py", "vitconvert/py.typed",
            "vitconvert/methods/dge/execution_costs.json"} <= names


def test_methods_hold_no_family_name_branches() -> None:
    """Family knowledge lives in backbones/: no comparison in a method module names a family (``family == "vit"``,
    ``kind == "pvt_v2"``...); a method asks the family adapter instead. Declaring ``families = (...)`` is fine."""
    from vitconvert.backbones import FAMILIES

    names = set(FAMILIES) | {"pvt"}
    found = []
    for path in (PACKAGE / "methods").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                parts = [node.left, *node.comparators]
                values = [e.value for p in parts for e in ast.walk(p) if isinstance(e, ast.Constant)]
                if any(v in names for v in values if isinstance(v, str)):
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert found == []
