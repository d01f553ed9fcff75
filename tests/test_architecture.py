"""The package's import graph keeps the shape the README's architecture section promises.

Every module of ``hsr_pl/`` and ``callbacks/`` (installed as ``hsr_pl.callbacks``) is parsed with
``ast`` — nothing is imported — and each import, at module top or inside a function, becomes an
arrow between first-party modules. The rules:

(a) no import cycle among the package's modules;
(b) no callback module imports another callback module (callbacks share only ``base`` and the
    private ``_*`` lifecycle helpers);
(c) a first-party import inside a function is allowed only where it keeps an optional dependency
    optional, and says so in a comment that starts with ``# optional:`` on its line or the line above;
(d) library modules never import ``hsr_pl.callbacks``; only the entry points that assemble a run do.

Modules are discovered by walking the folders, so new files are checked without editing this test.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"hsr_pl": REPO / "hsr_pl", "hsr_pl.callbacks": REPO / "callbacks"}
CALLBACKS = "hsr_pl.callbacks"
# Entry points that assemble a whole run from callbacks, model and data: they sit above the library.
ENTRY_POINTS = {"hsr_pl.cli", "hsr_pl.repair", "hsr_pl.audit", "hsr_pl.__main__"}
# Shared by every callback module: the base classes, the package's own re-exports.
CALLBACK_SHARED = {"base", "__init__"}

# Known callbacks/ violations that the callbacks' own refactor (issue 17, branch arch-cb) removes,
# as (importer, imported module). The lead empties both sets after merging that branch: a violation
# not named here fails the test, and so does a named one that no longer occurs.
# Rule (b): a callback module importing another callback module.
KNOWN_CALLBACK_IMPORTS: set[tuple[str, str]] = set()
# Rule (c): first-party imports inside callback methods, without an optional dependency to keep optional.
KNOWN_FUNCTION_LEVEL: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted first-party module name
    line: int
    in_function: bool
    reason: bool  # an ``# optional:`` comment on the line or the one above


def module_name(package: str, root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def discover() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package, root in PACKAGE_DIRS.items():
        for path in sorted(root.rglob("*.py")):
            if not (path.parent / "__init__.py").exists():
                continue  # data folders (assets) are not modules
            name = module_name(package, root, path)
            if package == "hsr_pl" and name.startswith(CALLBACKS):
                continue
            modules[name] = path
    return modules


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    source = path.read_text()
    lines = source.splitlines()
    is_package = path.name == "__init__.py"

    def reason(lineno: int) -> bool:
        here = lines[lineno - 1]
        above = lines[lineno - 2].strip() if lineno >= 2 else ""
        return "# optional:" in here or above.startswith("# optional:")

    def first_party(dotted: str) -> str | None:
        """The module an import runs: the longest first-party prefix of ``dotted``."""
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in modules:
                return candidate
        return None

    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # never runs
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(name, is_package, child)
                # ``from pkg import sub`` runs ``pkg.sub`` when ``sub`` is a module, else ``pkg``.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
            for dotted in targets:
                target = first_party(dotted)
                if target is not None and target != name:
                    found.append(Import(name, target, child.lineno, in_function, reason(child.lineno)))
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], list[Import]]:
    modules = discover()
    edges = [imp for name, path in modules.items() for imp in imports_of(name, path, modules)]
    return modules, edges


def _where(imp: Import, modules: dict[str, Path]) -> str:
    return f"{modules[imp.importer].relative_to(REPO)}:{imp.line} imports {imp.target}"


def _cycles(nodes: list[str], edges: list[Import]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    succ: dict[str, set[str]] = {n: set() for n in nodes}
    for e in edges:
        succ[e.importer].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(succ[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(succ[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def _is_callback_module(name: str) -> bool:
    if not name.startswith(CALLBACKS + "."):
        return False
    leaf = name.rsplit(".", 1)[1]
    return not leaf.startswith("_") and leaf not in CALLBACK_SHARED


def test_the_walk_sees_the_package(graph):
    modules, edges = graph
    # A broken walk would make every rule below pass vacuously.
    assert "hsr_pl.module" in modules and "hsr_pl.callbacks.realignment" in modules
    assert len(modules) > 50
    assert any(e.importer == "hsr_pl.callbacks.realignment" for e in edges)


def _with_parent_packages(modules: dict[str, Path], edges: list[Import]) -> list[Import]:
    """Importing ``a.b.c`` first runs ``a/__init__`` and ``a/b/__init__``: those are arrows too
    (except to the importer's own packages, which are already running)."""
    out = list(edges)
    for e in edges:
        parts = e.target.split(".")
        for end in range(1, len(parts)):
            parent = ".".join(parts[:end])
            if parent in modules and parent != e.importer and not e.importer.startswith(parent + "."):
                out.append(Import(e.importer, parent, e.line, e.in_function, e.reason))
    return out


def test_no_import_cycles(graph):
    modules, edges = graph
    cycles = _cycles(sorted(modules), _with_parent_packages(modules, edges))
    assert not cycles, "import cycles among hsr_pl modules: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_callback_imports_another_callback(graph):
    modules, edges = graph
    bad = sorted({
        _where(e, modules) for e in edges
        if _is_callback_module(e.importer) and _is_callback_module(e.target) and e.importer != e.target
        and (e.importer, e.target) not in KNOWN_CALLBACK_IMPORTS
    })
    assert not bad, "callback modules import each other (share code through hsr_pl/ or callbacks/_*.py):\n" + "\n".join(bad)


def test_function_level_imports_only_keep_optional_dependencies_optional(graph):
    modules, edges = graph
    bad = sorted({
        _where(e, modules) for e in edges
        if e.in_function and not e.reason and (e.importer, e.target) not in KNOWN_FUNCTION_LEVEL
    })
    assert not bad, (
        "first-party imports inside functions (move them to the module top, or say '# optional: <why>' "
        "when they keep an optional dependency optional):\n" + "\n".join(bad)
    )


def test_library_does_not_import_callbacks(graph):
    modules, edges = graph
    bad = sorted({
        _where(e, modules) for e in edges
        if not e.importer.startswith(CALLBACKS) and e.importer not in ENTRY_POINTS
        and (e.target == CALLBACKS or e.target.startswith(CALLBACKS + "."))
    })
    assert not bad, "library modules import hsr_pl.callbacks (the arrow runs callbacks -> library):\n" + "\n".join(bad)


def test_the_known_callback_violations_still_occur(graph):
    """An allow-listed violation that is gone must leave the list (so the list only shrinks)."""
    modules, edges = graph
    pairs = {(e.importer, e.target) for e in edges}
    function_level = {(e.importer, e.target) for e in edges if e.in_function and not e.reason}
    gone = sorted((KNOWN_CALLBACK_IMPORTS - pairs) | (KNOWN_FUNCTION_LEVEL - function_level))
    assert not gone, f"fixed, now remove from the allow-list in {Path(__file__).name}: {gone}"


def _fake_package(tmp_path: Path, files: dict[str, str]) -> tuple[dict[str, Path], list[Import]]:
    modules = {}
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for rel in files:
        path = tmp_path / rel
        package = "hsr_pl.callbacks" if rel.startswith("callbacks/") else "hsr_pl"
        root = tmp_path / ("callbacks" if package == CALLBACKS else "hsr_pl")
        modules[module_name(package, root, path)] = path
    edges = [imp for name, path in modules.items() for imp in imports_of(name, path, modules)]
    return modules, edges


def test_the_rules_catch_what_they_name(tmp_path):
    """Each rule fires on a small package that breaks it (so a green run means something)."""
    modules, edges = _fake_package(tmp_path, {
        "hsr_pl/__init__.py": "",
        "hsr_pl/a.py": "from .b import x\n",
        "hsr_pl/sub/__init__.py": "",
        "hsr_pl/sub/b.py": "",
        "hsr_pl/b.py": "def f():\n    from hsr_pl import a\n",
        "hsr_pl/c.py": "def f():\n    # optional: matplotlib\n    from . import a\n",
        "hsr_pl/d.py": "from hsr_pl.callbacks import x\nfrom .sub import b\n",
        "callbacks/__init__.py": "",
        "callbacks/base.py": "",
        "callbacks/_common.py": "",
        "callbacks/one.py": "from .base import B\nfrom ._common import c\nfrom hsr_pl.callbacks.two import T\n",
        "callbacks/two.py": "",
    })
    by_pair = {(e.importer, e.target): e for e in edges}
    assert _cycles(sorted(modules), edges) == [["hsr_pl.a", "hsr_pl.b"]]
    # a cycle only through a package's __init__: sub/__init__ imports e, e imports sub.b
    modules2, edges2 = _fake_package(tmp_path / "two", {
        "hsr_pl/__init__.py": "",
        "hsr_pl/sub/__init__.py": "from ..e import y\n",
        "hsr_pl/sub/b.py": "",
        "hsr_pl/e.py": "from .sub.b import x\n",
    })
    assert _cycles(sorted(modules2), edges2) == []
    assert _cycles(sorted(modules2), _with_parent_packages(modules2, edges2)) == [["hsr_pl.e", "hsr_pl.sub"]]
    assert by_pair[("hsr_pl.b", "hsr_pl.a")].in_function and not by_pair[("hsr_pl.b", "hsr_pl.a")].reason
    assert by_pair[("hsr_pl.c", "hsr_pl.a")].in_function and by_pair[("hsr_pl.c", "hsr_pl.a")].reason
    assert not by_pair[("hsr_pl.a", "hsr_pl.b")].in_function
    assert ("hsr_pl.d", "hsr_pl.sub.b") in by_pair and ("hsr_pl.d", "hsr_pl.callbacks") in by_pair
    callback_pairs = {(e.importer, e.target) for e in edges
                      if _is_callback_module(e.importer) and _is_callback_module(e.target)}
    assert callback_pairs == {("hsr_pl.callbacks.one", "hsr_pl.callbacks.two")}
