"""The package's shape: imports flow one way, no function-local import dodges a cycle, functions fit a screen."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "loha_diffusion"
MAX_FUNCTION_LINES = 100
# Modules that may import package modules inside functions: the command line, for start-up time.
LAZY_IMPORTS_ALLOWED = {"loha_diffusion.cli"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an `ImportFrom` reads from."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, path: Path, node: ast.AST, known: set[str]) -> list[str]:
    """Package modules an import statement loads (a submodule when `from pkg import submodule`)."""
    found = []
    if isinstance(node, ast.Import):
        found = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        source = _resolve(module, path, node)
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            found.append(sub if sub in known else source)
    return [t for t in found if t in known and t != module]


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _module_level_imports(tree: ast.Module) -> list[ast.AST]:
    out = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, (ast.If, ast.Try)) and not _is_type_checking(node):
            out += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return out


def _functions(tree: ast.Module):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = {t for node in _module_level_imports(tree) for t in _targets(name, path, node, known)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_local_import_of_package_modules():
    modules = _modules()
    known = set(modules)
    offenders = []
    for name, path in modules.items():
        if name in LAZY_IMPORTS_ALLOWED:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in _functions(tree):
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and _targets(name, path, node, known):
                    offenders.append(f"{name}.{func.name} (line {node.lineno}): {ast.unparse(node)}")
    assert not offenders, "function-local imports of package modules:\n" + "\n".join(sorted(set(offenders)))


def test_no_function_longer_than_a_limit():
    long = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in _functions(tree):
            start = min([func.lineno] + [d.lineno for d in func.decorator_list])
            length = func.end_lineno - start + 1
            if length > MAX_FUNCTION_LINES:
                long.append(f"{name}.{func.name}: {length} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def _direct_raises(func: ast.AST) -> bool:
    """Whether `func` itself (not a nested function) has a `raise` with an exception (a bare re-raise is not
    counted)."""
    todo = list(ast.iter_child_nodes(func))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            # Abstract methods and "unreachable" asserts are not errors a caller handles.
            if not (isinstance(exc, ast.Name) and exc.id in ("NotImplementedError", "AssertionError")):
                return True
        todo.extend(ast.iter_child_nodes(node))
    return False


def _public_functions(tree: ast.Module):
    """Module-level public functions and public methods of public classes."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            yield node.name, node
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith(
                    "_"
                ):
                    yield f"{node.name}.{item.name}", item


def test_public_functions_that_raise_say_what_they_raise():
    silent = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for qualname, func in _public_functions(tree):
            doc = ast.get_docstring(func) or ""
            if _direct_raises(func) and "raise" not in doc.lower():
                silent.append(f"{name}.{qualname} (line {func.lineno})")
    assert not silent, "public functions that raise without saying so:\n" + "\n".join(silent)
