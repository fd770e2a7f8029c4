"""The package's structure, read from its source with `ast`: layers, sizes, privacy.

- Imports go one way: a module imports from its own layer or from those below it
  (`LAYERS`, lowest first, the list `deepmode_async/__init__.py` states), never up,
  and no chain of imports comes back to where it started. Every import counts, those
  inside functions and under `TYPE_CHECKING` too: each is a dependency all the same.
- No file over 450 lines (the generated `resources/_blocking.py` aside), no class
  over 250.
- No module touches another's private members: it imports no `_name` from another
  module (private modules themselves, `from . import _validate`, are the package's
  to share), and it reads `obj._name`, for a `_name` the package defines somewhere,
  only when that module defines it too, or, as `self._name`, when a base class of the
  class it is in does (a subclass using its base's protected members).
"""

from __future__ import annotations

import ast
import functools
import pathlib
import re

import attrs

PACKAGE = "deepmode_async"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE

#: The layers, lowest first, by the name of the top-level module or package under
#: `deepmode_async` (`__init__` is the package itself).
LAYERS: list[set[str]] = [
    {"_version", "_public", "_formats", "_errors", "_validate", "_types", "_convert", "_encoding"},
    {"_tasks", "_timeout", "_requests", "stores"},
    {
        "_raw",
        "_connection",
        "_failures",
        "_retry",
        "_pacing",
        "_shared_backoff",
        "_transport",
        "_uploads",
        "_downloads",
    },
    {"_journal", "batch", "callbacks", "prep"},
    {"resources"},
    {"_client", "_sync", "__init__"},
    {"testing", "_mock_options", "_loop"},
    {"cli", "__main__"},
]

MAX_FILE_LINES = 450
MAX_CLASS_LINES = 250
GENERATED = {"resources/_blocking.py"}


@attrs.frozen
class Module:
    name: str  # dotted: deepmode_async.resources.images
    path: pathlib.Path
    tree: ast.Module

    @property
    def relative(self) -> str:
        return self.path.relative_to(ROOT).as_posix()

    @property
    def package(self) -> str:
        """The package relative imports start from."""
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]

    @property
    def top(self) -> str:
        """Its layer's key: the first component under the package."""
        parts = self.name.split(".")
        return parts[1] if len(parts) > 1 else "__init__"


@functools.cache
def modules() -> dict[str, Module]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        found[name] = Module(name, path, ast.parse(path.read_text(), str(path)))
    return found


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@functools.cache
def imports() -> dict[str, list[tuple[str, int]]]:
    """For each module, the package's modules it imports (and the line of each)."""
    known = modules()
    graph: dict[str, list[tuple[str, int]]] = {}
    for module in known.values():
        edges: list[tuple[str, int]] = []
        for node in ast.walk(module.tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(module, node)
                for alias in node.names:  # `from . import x`: x may be a module itself
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in known else source)
            else:
                continue
            edges += [(target, node.lineno) for target in targets if target in known]
        graph[module.name] = [(target, line) for target, line in edges if target != module.name]
    return graph


def layer_of(module: Module) -> int | None:
    for index, layer in enumerate(LAYERS):
        if module.top in layer:
            return index
    return None


# ----------------------------------------------------------------------------- imports


def test_every_module_has_a_layer() -> None:
    missing = sorted({m.top for m in modules().values() if layer_of(m) is None})
    assert missing == [], f"add these to LAYERS (and to __init__.py's list): {missing}"


def test_the_layers_are_those_the_package_states() -> None:
    doc = ast.get_docstring(modules()[PACKAGE].tree) or ""
    stated = [
        {name.strip(" `.\n") for name in match.split(",")}
        # A layer's list may go on over indented lines.
        for match in re.findall(r"^\d+\. [^:]+: (.+(?:\n   .+)*)$", doc, flags=re.MULTILINE)
    ]
    assert stated == LAYERS


def test_imports_never_go_up_a_layer() -> None:
    known = modules()
    upward = []
    for name, edges in imports().items():
        here = known[name]
        for target, line in edges:
            there = known[target]
            low, high = layer_of(here), layer_of(there)
            if low is not None and high is not None and high > low:
                upward.append(f"{here.relative}:{line} imports {target} (layer {high} > {low})")
    assert upward == []


def test_no_import_circles() -> None:
    graph = {name: sorted({target for target, _ in edges}) for name, edges in imports().items()}
    circles = []
    for component in _strongly_connected(graph):
        if len(component) > 1:
            circles.append(" <-> ".join(sorted(component)))
    assert circles == []


def _strongly_connected(graph: dict[str, list[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iteratively: the sets of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    found.append(component)
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(graph[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_the_circle_finder_finds_a_circle() -> None:
    graph = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}
    assert [c for c in _strongly_connected(graph) if len(c) > 1] == [{"a", "b", "c"}]


# ----------------------------------------------------------------------------- sizes


def test_files_stay_small() -> None:
    long = [
        f"{m.relative}: {len(m.path.read_text().splitlines())} lines"
        for m in modules().values()
        if m.relative not in GENERATED and len(m.path.read_text().splitlines()) > MAX_FILE_LINES
    ]
    assert long == []


def test_classes_stay_small() -> None:
    long = []
    for module in modules().values():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.ClassDef) and module.relative not in GENERATED:
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    long.append(f"{module.relative}: class {node.name} has {lines} lines")
    assert long == []


# ----------------------------------------------------------------------------- privacy


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@functools.cache
def defined(name: str) -> frozenset[str]:
    """The private names a module defines: functions, classes, attributes it stores,
    class-body names, module-level names."""
    found: set[str] = set()
    for node in ast.walk(modules()[name].tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            found.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found.add(node.id)
        elif isinstance(node, ast.alias):
            found.add(node.asname or node.name.split(".")[0])
    return frozenset(n for n in found if _private(n))


@functools.cache
def package_privates() -> frozenset[str]:
    """Every private name some module of the package defines. Others' (argparse's
    `_actions`) are not the package's boundaries to keep, so not checked here."""
    return frozenset().union(*(defined(name) for name in modules()))


def _class_members(module_name: str, class_name: str, seen: frozenset[str]) -> set[str]:
    """The private names a class of the package and its bases (within it) define."""
    key = f"{module_name}.{class_name}"
    if key in seen:
        return set()
    module = modules()[module_name]
    for node in module.tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            members = {
                n.attr
                for n in ast.walk(node)
                if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
            } | {
                n.name
                for n in node.body
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            }
            for base in node.bases:
                if isinstance(base, ast.Name):
                    origin = _origin(module, base.id)
                    if origin is not None:
                        members |= _class_members(*origin, seen | {key})
            return members
    return set()


def _origin(module: Module, name: str) -> tuple[str, str] | None:
    """Where a name used in `module` comes from: (module, name) within the package."""
    for node in module.tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return module.name, name
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    source = _absolute(module, node)
                    if source in modules():
                        return _origin(modules()[source], alias.name) or None
    return None


class _PrivateUse(ast.NodeVisitor):
    def __init__(self, module: Module) -> None:
        self.module = module
        self.own = defined(module.name)
        self.classes: list[str] = []
        self.found: list[str] = []

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.classes.append(node.name)
        self.generic_visit(node)
        self.classes.pop()

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = _absolute(self.module, node)
        for alias in node.names:
            is_module = f"{source}.{alias.name}" in modules()
            if source.startswith(PACKAGE) and _private(alias.name) and not is_module:
                self.found.append(f"{self.module.relative}:{node.lineno} imports {alias.name}")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.generic_visit(node)
        name = node.attr
        if not _private(name) or name in self.own or name not in package_privates():
            return
        on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
        if (
            on_self
            and self.classes
            and name in _class_members(self.module.name, self.classes[-1], frozenset())
        ):
            return
        self.found.append(f"{self.module.relative}:{node.lineno} uses .{name}")


def test_no_module_touches_another_modules_private_members() -> None:
    found = []
    for module in modules().values():
        visitor = _PrivateUse(module)
        visitor.visit(module.tree)
        found += visitor.found
    assert found == []


def test_the_privacy_check_sees_a_reach_into_another_module() -> None:
    tree = ast.parse("from ._transport import _read_json\ndm.images._call('x')\n")
    module = Module(f"{PACKAGE}.example", ROOT / "example.py", tree)
    modules()[module.name] = module  # the cache holds it for `defined`
    try:
        visitor = _PrivateUse(module)
        visitor.visit(tree)
    finally:
        del modules()[module.name]
        defined.cache_clear()
        package_privates.cache_clear()
    assert visitor.found == ["example.py:1 imports _read_json", "example.py:2 uses ._call"]
