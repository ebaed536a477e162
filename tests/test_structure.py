"""The architecture the README promises, enforced: no import cycle in the package, no long function.

Both checks read the source with `ast` (nothing is imported). Imports inside functions count (a
lazy import is still a dependency); imports under ``if TYPE_CHECKING:`` do not (annotations only).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "torchgradcheck"
MAX_LINES = 60  # lines of code per function, docstring, blank lines and comments not counted


def _module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, root: Path = PACKAGE) -> set[str]:
    """The package modules `path` imports at run time (module level or inside functions)."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == root.name:
                if node.module is None or not node.level:
                    found.update(f"{target}.{a.name}" for a in node.names)  # `from . import _x`
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == root.name)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    return {m: {t for t in _imports(p, root) if t in files and t != m} for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        colour[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if colour.get(t) == 1:
                return [*stack[stack.index(t) :], t]
            if colour.get(t) is None and (found := dfs(t)):
                return found
        stack.pop()
        colour[m] = 2
        return None

    for m in sorted(graph):
        if colour.get(m) is None and (found := dfs(m)):
            return found
    return None


def long_functions(root: Path = PACKAGE, limit: int = MAX_LINES) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            skip: set[int] = set()
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                skip = set(range(first.lineno, (first.end_lineno or first.lineno) + 1))
            count = sum(
                1
                for i in range(node.lineno, (node.end_lineno or node.lineno) + 1)
                if i not in skip and lines[i - 1].strip() and not lines[i - 1].strip().startswith("#")
            )
            if count > limit:
                out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({count} lines)")
    return out


def test_no_import_cycle_inside_the_package():
    graph = import_graph()
    assert "torchgradcheck._check" in graph["torchgradcheck._verify"]  # the graph sees real imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_no_function_over_60_lines_of_code():
    assert long_functions() == []


def test_the_structure_checks_can_fail(tmp_path):
    """Both checks catch what they are for, on a small package written here."""
    pkg = tmp_path / "torchgradcheck"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_a.py").write_text("from ._b import g\n\ndef f():\n    return g()\n")
    (pkg / "_b.py").write_text("def g():\n    from ._a import f  # lazy, still a cycle\n    return f\n")
    (pkg / "_c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ._a import f\n"
        + "def long():\n    '''doc\n\n    not counted'''\n"
        + "".join(f"    x{i} = {i}\n" for i in range(61))
    )
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None
    assert set(cycle) == {"torchgradcheck._a", "torchgradcheck._b"}
    assert "torchgradcheck._a" not in import_graph(pkg)["torchgradcheck._c"]  # TYPE_CHECKING only
    assert long_functions(pkg) == ["torchgradcheck/_c.py:4 long (62 lines)"]
    assert long_functions(pkg, limit=62) == []


@pytest.mark.parametrize("sub", ["function", "distributed"])
def test_subpackages_say_what_they_may_import(sub):
    text = (PACKAGE / sub / "README.md").read_text()
    assert "What it may import" in text


def test_readme_development_section_names_every_package_file():
    readme = (PACKAGE.parent / "README.md").read_text()
    start = readme.index("The pipeline reads in the file names")
    end = readme.find("\n## ", start)
    section = readme[start : end if end > 0 else len(readme)]
    missing = [
        str(p.relative_to(PACKAGE))
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.name != "__init__.py" and f"`{p.name}`" not in section
    ]
    assert missing == [], f"add these to the README's development section: {missing}"
