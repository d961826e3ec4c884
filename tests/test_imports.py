"""The shape of the package: no import cycle among fan_jax modules, no module over 500 lines.

Imports are read with `ast` from the source (nothing is imported), at any depth: a lazy
import inside a function is an edge like a top-level one. `import fan_jax.a.b` and
`from fan_jax.a import b` (b a module) are edges to fan_jax.a.b; `from fan_jax.a import name`
(name not a module) is an edge to fan_jax.a. Relative imports are resolved. The implicit
import of a parent package when a submodule loads is not an edge (a package's __init__
re-exporting its submodules would otherwise always form a cycle with them).

    python tests/test_imports.py     # prints the graph's cycles and the long modules
"""

from __future__ import annotations

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "fan_jax"
MAX_LINES = 500


def module_files(root: str = ROOT) -> dict[str, str]:
    """{dotted module name: path} of every .py file under fan_jax/ (a package is its __init__)."""
    out = {}
    base = os.path.join(root, PACKAGE)
    for d, dirs, files in os.walk(base):
        dirs[:] = sorted(x for x in dirs if not x.startswith((".", "__pycache__")))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(d, f), root)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join(rel)] = os.path.join(d, f)
    return out


def _resolve(name: str, modules: dict[str, str]) -> str | None:
    """The longest fan_jax module that `name` (a dotted path) is or lies in."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules:
            return cand
        parts.pop()
    return None


def imports_of(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """The fan_jax modules `module` imports anywhere in its source (lazy imports included)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_pkg = os.path.basename(path) == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    target = _resolve(alias.name, modules)
                    if target:
                        out.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if sub in modules else _resolve(base, modules)
                if target:
                    out.add(target)
    out.discard(module)
    return out


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def long_modules(root: str = ROOT, limit: int = MAX_LINES) -> dict[str, int]:
    """{path relative to the repo: line count} of fan_jax/**/*.py files over `limit` lines."""
    out = {}
    for path in module_files(root).values():
        with open(path) as f:
            n = sum(1 for _ in f)
        if n > limit:
            out[os.path.relpath(path, root)] = n
    return out


def test_graph_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from fan_jax import b\n")
    (pkg / "b.py").write_text("import fan_jax.sub.c\nfrom fan_jax.sub import NAME\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import NAME\n")
    (pkg / "sub" / "c.py").write_text("from .. import a\nNAME = 1\n")
    graph = import_graph(str(tmp_path))
    assert graph["fan_jax.a"] == {"fan_jax.b"}
    assert graph["fan_jax.b"] == {"fan_jax.sub.c", "fan_jax.sub"}
    assert graph["fan_jax.sub"] == {"fan_jax.sub.c"}
    assert graph["fan_jax.sub.c"] == {"fan_jax.a"}
    assert cycles(graph) == [["fan_jax.a", "fan_jax.b", "fan_jax.sub", "fan_jax.sub.c"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles among fan_jax modules: " + "; ".join(
        " <-> ".join(c) for c in found
    )


def test_no_module_over_500_lines():
    found = long_modules()
    assert not found, f"fan_jax modules over {MAX_LINES} lines (split them): {found}"


if __name__ == "__main__":
    graph = import_graph()
    for c in cycles(graph):
        print("cycle:", " <-> ".join(c))
    for path, n in sorted(long_modules().items()):
        print(f"{n:5d} lines: {path}")
