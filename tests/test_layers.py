"""The package's import graph: no cycle, and every import points down the layers.

The graph is read from the source with `ast`, so an import inside a function counts exactly
like one at the top of a module: a cycle hidden in a function body fails here too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "proxy"

# Top to bottom (see ARCHITECTURE.md). A module may import from any layer below its own,
# never from its own layer or above. Within one package (proxy.store, proxy.tools) modules
# may import each other, as long as there is no cycle. An entry stands for the module and,
# except for the bare package, everything under it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("proxy.__main__",),
    ("proxy.cli",),
    ("proxy.tools",),
    ("proxy.workers",),
    ("proxy.server",),
    ("proxy.admin",),
    ("proxy.app", "proxy.reload"),
    ("proxy.flow", "proxy.tracing"),
    ("proxy.owner", "proxy.exchange", "proxy.bodies", "proxy.observing"),
    ("proxy.leases", "proxy.identity", "proxy.contract"),
    ("proxy.targets",),
    ("proxy.routing", "proxy.upstream", "proxy.store"),
    ("proxy.keys",),
    ("proxy.fingerprints",),
    ("proxy.config", "proxy.errors", "proxy.metrics", "proxy.logs"),
    ("proxy.outcomes", "proxy.store_url", "proxy.tasks"),
    ("proxy.masking",),
    ("proxy",),
)


def parse(path: Path) -> ast.Module:
    """`path` parsed in a thread of its own. CPython 3.11.7's parser fails with a SystemError
    ("AST constructor recursion depth mismatch") in a thread that caught a RecursionError
    earlier, which the fingerprint tests cause on purpose (deeply nested JSON)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(ast.parse, path.read_text(), str(path)).result()


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its `__init__.py`)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """The package's modules that `name` imports anywhere in its source, with the line."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _known(alias.name, node.lineno, known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                anchor = here[: len(here) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield from _known(submodule if submodule in known else base, node.lineno, known)


def _known(target: str, line: int, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    while target and target not in known:
        target = target.rpartition(".")[0]
    if target:
        yield target, line


def graph() -> dict[str, dict[str, int]]:
    """module -> {module it imports: first line that does}."""
    known = modules()
    edges: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        edges[name] = {}
        for target, line in imported(name, path, known):
            if target != name:
                edges[name].setdefault(target, line)
    return edges


def unit(module: str) -> str:
    """The LAYERS entry a module belongs to ('' if none)."""
    entries = [entry for layer in LAYERS for entry in layer]
    # The bare package holds only what every module may use (the version): it covers itself.
    matches = [e for e in entries if module == e or (e != "proxy" and module.startswith(e + "."))]
    return max(matches, key=len, default="")


def layer_of(entry: str) -> int:
    return next(index for index, layer in enumerate(LAYERS) if entry in layer)


def find_cycle(edges: dict[str, dict[str, int]]) -> list[str]:
    """One import cycle as a path that starts and ends at the same module, or []."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = "open"
        stack.append(module)
        for target in sorted(edges.get(module, {})):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = "done"
        return []

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            return cycle
    return []


def test_the_graph_sees_imports_inside_functions(tmp_path: Path) -> None:
    """An import in a function body is an edge of the graph, like a module-level one."""
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef later():\n    from proxy import server\n    return server\n")
    assert dict(imported("proxy.probe", probe, modules())) == {"proxy.server": 4}


def test_a_cycle_is_found_however_long() -> None:
    """The cycle check reports a three-module cycle and accepts a diamond."""
    cycle = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}
    diamond = {"a": {"b": 1, "c": 1}, "b": {"d": 1}, "c": {"d": 1}, "d": {}}
    assert find_cycle(cycle) == ["a", "b", "c", "a"]
    assert find_cycle(diamond) == []


def test_the_package_has_no_import_cycle() -> None:
    """No import cycle in proxy/, counting imports inside functions."""
    cycle = find_cycle(graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer() -> None:
    """Each module of proxy/ is placed in LAYERS, so the next check covers it."""
    unplaced = sorted(module for module in modules() if not unit(module))
    assert not unplaced, f"add these modules to LAYERS in {Path(__file__).name}: {unplaced}"


def test_imports_point_down_the_layers() -> None:
    """A module imports only from lower layers (or its own package), never upward."""
    wrong = []
    for module, targets in sorted(graph().items()):
        source = unit(module)
        for target, line in sorted(targets.items()):
            destination = unit(target)
            same = not source or not destination or source == destination
            if not same and layer_of(destination) <= layer_of(source):
                wrong.append(f"{module}:{line} imports {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_module_imports_private_names_of_another() -> None:
    """`from proxy.x import _name` is refused: a name another module needs is public."""
    private = []
    for path in [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "tests").rglob("*.py")]:
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("proxy"):
                names = [alias.name for alias in node.names]
                private += [f"{path.name}:{node.lineno} {name}" for name in names
                            if name.startswith("_") and not name.startswith("__")]  # fmt: skip
    assert not private, f"private names imported across modules: {private}"
