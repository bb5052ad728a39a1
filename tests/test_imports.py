"""samkd's subpackages import each other in one direction: no import cycle spans two of them
(`samkd.evaluate` and `samkd.export`, for example, where eval runs the exported files and the
export checks them with eval's measurements)."""

import ast
from pathlib import Path

import samkd

ROOT = Path(samkd.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every module or name that `path` imports, at any depth (inside functions too), except
    under `if TYPE_CHECKING:`; relative imports resolved."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for branch in child.orelse:
                    visit(branch)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    prefix = package[: len(package) - child.level + 1]
                    base = ".".join(prefix + ([child.module] if child.module else []))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def subpackage(module: str) -> str:
    """`samkd.evaluate` of `samkd.evaluate.run`; a top-level module is its own."""
    return ".".join(module.split(".")[:2])


def subpackage_graph() -> dict[str, set[str]]:
    """Which of samkd's subpackages (and top-level modules) each imports. Importing
    `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` too."""
    modules = {module_name(path): path for path in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(subpackage(name), set())
        for imported in imported_names(path):
            parts = imported.split(".")
            for length in range(2, len(parts) + 1):
                target = ".".join(parts[:length])
                if target in modules and subpackage(target) != subpackage(name):
                    edges.add(subpackage(target))
    return graph


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path of imports from `start` back to it, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for target in sorted(graph.get(node, ())):
            if target == start:
                return [*path, start]
            if target not in seen:
                seen.add(target)
                stack.append((target, [*path, target]))
    return None


def test_no_import_cycle_spans_two_subpackages() -> None:
    graph = subpackage_graph()
    assert {"samkd.evaluate", "samkd.export", "samkd.train"} <= set(graph)
    assert "samkd.evaluate" in graph["samkd.export"]  # the checker sees function-level imports
    cycles = [cycle for node in sorted(graph) if (cycle := cycle_through(graph, node))]
    assert cycles == [], " -> ".join(cycles[0])
