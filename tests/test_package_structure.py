"""Package structure: no import circles, production code never imports the test kit, no hidden imports.

Read from the source (AST), nothing is imported: every module of agro_megatron is found with
pkgutil (recursively, like `pkgutil.walk_packages`, but without importing the packages, so a heavy
or broken `__init__` can neither hide modules nor run code here).

Import-graph rule (test a). Nodes are agro_megatron's modules (a package is its `__init__`). Every
import statement counts wherever it is: module level, inside functions and methods (lazy imports),
class bodies, `try:` and `if TYPE_CHECKING:` blocks. A lazy import still makes the importer
depend on the imported module; "no import circles" means none of either kind. Edges:

* `import a.b.c` (with or without `as`)  -> a.b.c
* `from a.b import c`                    -> a.b.c when a.b.c is a module, else a.b (c is a name in a.b)
* relative imports are resolved against the importing module first.

Importing a.b.c also executes a and a.b's `__init__`, but that is not an edge: a package's
`__init__` importing its own submodules (re-exports) would otherwise make every submodule that
imports a sibling a "cycle" through its parent. A module that imports names from its own package
(`from agro_megatron.rollout import X` inside agro_megatron/rollout/) does get the edge to the
package `__init__`, so a re-exporting `__init__` and a submodule that imports from it are a cycle.

Test b: nothing under agro_megatron/ outside agro_megatron/testing/ imports agro_megatron.testing
(the test kit may import production code, not the other way round).

Test c: no imports by string outside agro_megatron/testing/: no `importlib.import_module`, no
`__import__`, and no `importlib` use other than `importlib.metadata` (installed versions) and
`importlib.util.find_spec` (optional-package probes; loading a module from a spec is an import by
string too). Prefer `try: import x / except ImportError` to a probe.
"""
from __future__ import annotations

import ast
import os
import pkgutil
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import agro_megatron

PACKAGE = "agro_megatron"
TESTING = f"{PACKAGE}.testing"
ROOT = Path(agro_megatron.__file__).resolve().parent


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module = field(repr=False)


def walk_modules(root: Path = ROOT, prefix: str = PACKAGE) -> dict[str, Module]:
    """Every module under `root` (the package itself included), by dotted name, parsed."""
    found = {prefix: Module(prefix, root / "__init__.py", True, _parse(root / "__init__.py"))}
    for info in pkgutil.iter_modules([str(root)], prefix + "."):
        leaf = info.name.rpartition(".")[2]
        if info.ispkg:
            found.update(walk_modules(root / leaf, info.name))
        else:
            path = root / f"{leaf}.py"
            found[info.name] = Module(info.name, path, False, _parse(path))
    return found


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _resolve(module: Module, level: int, name: str | None) -> str:
    """The absolute name a (possibly relative) `from ... import` refers to."""
    if level == 0:
        return name or ""
    parts = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    if level - 1 > len(parts) - 1:
        raise AssertionError(f"{module.path}: relative import beyond the top-level package")
    base = parts[:len(parts) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _ours(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def import_edges(modules: dict[str, Module]) -> dict[str, dict[str, int]]:
    """{importer: {imported agro_megatron module: first line}}, by the rule in the module docstring."""
    edges: dict[str, dict[str, int]] = {}
    missing = []
    for mod in modules.values():
        out = edges.setdefault(mod.name, {})
        for node in ast.walk(mod.tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if _ours(a.name)]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, node.level, node.module)
                if not _ours(base):
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                if target not in modules:
                    missing.append(f"{mod.path}:{node.lineno}: imports {target}, which does not exist")
                    continue
                out.setdefault(target, node.lineno)
    assert not missing, "\n".join(missing)
    return edges


def _cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with a cycle (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    scc = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        scc.append(member)
                        if member == node:
                            break
                    if len(scc) > 1 or node in edges[node]:
                        out.append(sorted(scc))
    return out


def _one_cycle(edges: dict[str, dict[str, int]], scc: list[str]) -> list[str]:
    """A shortest import path from the component's first module back to itself."""
    members, start = set(scc), scc[0]
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(edges[node]):
            if child not in members:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle through {start}")


def describe_cycles(edges: dict[str, dict[str, int]], modules: dict[str, Module]) -> list[str]:
    reports = []
    for scc in _cycles(edges):
        path = _one_cycle(edges, scc)
        steps = [f"{a} -> {b}  ({modules[a].path.relative_to(ROOT.parent)}:{edges[a][b]})"
                 for a, b in zip(path, path[1:])]
        reports.append(f"import cycle among {', '.join(scc)}:\n    " + "\n    ".join(steps))
    return reports


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return walk_modules()


@pytest.fixture(scope="module")
def edges(modules) -> dict[str, dict[str, int]]:
    return import_edges(modules)


def test_every_source_file_is_a_module_of_the_package(modules):
    """pkgutil finds every .py file (a folder without __init__.py would hide its modules)."""
    files = {p.resolve() for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts}
    assert {m.path.resolve() for m in modules.values()} == files


def test_no_import_cycles(modules, edges):
    reports = describe_cycles(edges, modules)
    assert not reports, "\n".join(reports)


def test_the_cycle_check_finds_lazy_and_package_cycles(tmp_path):
    """The rule on a made-up package: a lazy import closes a cycle, and so does a submodule that
    imports from its re-exporting parent; a parent importing its children alone does not."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from agro_megatron import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "sub" / "__init__.py").write_text("from agro_megatron.sub.x import X\nfrom .y import Y\n")
    (pkg / "sub" / "x.py").write_text("X = 1\n")
    (pkg / "sub" / "y.py").write_text("import agro_megatron.sub.x\nY = 2\n")
    (pkg / "sub" / "z.py").write_text("def g():\n    from agro_megatron.sub import X\n")
    fake = walk_modules(pkg, PACKAGE)
    found = _cycles(import_edges(fake))
    assert found == [["agro_megatron.a", "agro_megatron.b"]]
    (pkg / "sub" / "__init__.py").write_text("from agro_megatron.sub.z import g\n")
    found = _cycles(import_edges(walk_modules(pkg, PACKAGE)))
    assert ["agro_megatron.sub", "agro_megatron.sub.z"] in found


def test_production_code_does_not_import_the_test_kit(modules, edges):
    bad = [f"{modules[src].path.relative_to(ROOT.parent)}:{line}: imports {dst}"
           for src, targets in sorted(edges.items()) if not _is_testing(src)
           for dst, line in sorted(targets.items()) if _is_testing(dst)]
    assert not bad, "agro_megatron.testing is for tests only:\n" + "\n".join(bad)


def _is_testing(name: str) -> bool:
    return name == TESTING or name.startswith(TESTING + ".")


_ALLOWED_IMPORTLIB = ("importlib.metadata", "importlib.util.find_spec")


def _allowed_importlib(dotted: str) -> bool:
    return any(dotted == ok or dotted.startswith(ok + ".") or ok.startswith(dotted + ".")
               for ok in _ALLOWED_IMPORTLIB)


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id] + parts[::-1])
    return None


def string_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, what) for every import by string / disallowed importlib use in `tree`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "importlib" and not _allowed_importlib(alias.name):
                    found.append((node.lineno, f"import {alias.name}"))
                elif alias.name == "importlib.util" and alias.asname:
                    found.append((node.lineno, f"import importlib.util as {alias.asname}"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "importlib":
                for alias in node.names:
                    dotted = f"{node.module}.{alias.name}"
                    if not _allowed_importlib(dotted) or dotted == "importlib.util":
                        found.append((node.lineno, f"from {node.module} import {alias.name}"))
            elif node.module == "builtins" and any(a.name == "__import__" for a in node.names):
                found.append((node.lineno, "from builtins import __import__"))
        elif isinstance(node, ast.Name) and node.id == "__import__":
            found.append((node.lineno, "__import__"))
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if node.attr == "__import__":
                found.append((node.lineno, dotted or "….__import__"))
            elif dotted and dotted.split(".")[0] == "importlib" and dotted.count(".") == 1 \
                    and not _allowed_importlib(dotted) and dotted != "importlib.util":
                found.append((node.lineno, dotted))
            elif dotted and dotted.startswith("importlib.util.") and not _allowed_importlib(dotted):
                found.append((node.lineno, dotted))
        elif isinstance(node, ast.Constant) and node.value == "__import__":
            found.append((node.lineno, "'__import__' (by name)"))
    return sorted(set(found))


def test_no_imports_by_string(modules):
    bad = [f"{m.path.relative_to(ROOT.parent)}:{line}: {what}"
           for m in sorted(modules.values(), key=lambda m: m.name) if not _is_testing(m.name)
           for line, what in string_imports(m.tree)]
    assert not bad, ("import plainly (`import x`, `from x import y`, inside a function when it must be "
                     "lazy; `try/except ImportError` for optional packages):\n" + "\n".join(bad))


@pytest.mark.parametrize("source,flagged", [
    ("import importlib\nm = importlib.import_module('x')", True),
    ("import importlib.util\nm = importlib.import_module('x')", True),
    ("from importlib import import_module", True),
    ("m = __import__('types')", True),
    ("import builtins\nm = builtins.__import__('types')", True),
    ("m = getattr(__builtins__, '__import__')('types')", True),
    ("import importlib.util\ns = importlib.util.spec_from_file_location('m', 'm.py')", True),
    ("import importlib.util\nok = importlib.util.find_spec('vllm') is not None", False),
    ("from importlib.util import find_spec", False),
    ("import importlib.metadata\nv = importlib.metadata.version('torch')", False),
    ("from importlib.metadata import PackageNotFoundError, version", False),
    ("def f():\n    import vllm\n    return vllm", False),
])
def test_the_string_import_check(source, flagged):
    assert bool(string_imports(ast.parse(source))) == flagged, source


def test_the_checks_run_on_the_real_tree(modules, edges):
    """Guards against a vacuous pass: the graph has the package's known plain edges."""
    assert len(modules) > 50
    assert "agro_megatron.rewards.extract" in edges["agro_megatron.data.problem"]
    assert "agro_megatron.rollout.vllm_engine" in edges["agro_megatron.rollout.factory"]  # a lazy import
    assert os.path.basename(modules["agro_megatron.rollout"].path) == "__init__.py"
