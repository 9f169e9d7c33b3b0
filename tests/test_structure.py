"""The package's architecture, enforced: rooms by layer with imports flowing one way, no import
cycles, no module importing another's private names, and the HTTP layer never touching JAX."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "swiftkv_jax"

# Each room of the package and its level: a module may import from its own room or from a room
# of a lower level, never upward or sideways (io and runtime are peers: neither imports the other).
# The package's __init__ (the public API, imported lazily) sits above them all.
LEVELS = {
    "cli": 7,
    "serve": 6,
    "train": 5,
    "io": 4, "runtime": 4,
    "sharding": 3,
    "model": 2,
    "kernels": 1,
    "text": 0, "config": 0, "compile_cache": 0,
}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, str]]:
    """(absolute module, name) for every import of the package's own modules, at any depth
    (inside functions and TYPE_CHECKING blocks too: a cycle there is still a cycle in the design)."""
    name = next(m for m, p in MODULES.items() if p == path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "swiftkv_jax":
                out += [(module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "swiftkv_jax"]
    return out


def _edges() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (`from .pkg import module` counts as the module)."""
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = set()
        for module, imported in _imports(path):
            targets.add(f"{module}.{imported}" if f"{module}.{imported}" in MODULES else module)
        edges[name] = {t for t in targets if t in MODULES and t != name}
    return edges


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package's __init__


def upward_imports(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports that break the layer order (the top-level __init__ may import anything)."""
    bad = []
    for source, targets in edges.items():
        src = _room(source)
        if src is None:
            continue
        for target in targets:
            dst = _room(target)
            if dst is None or (dst != src and LEVELS[dst] >= LEVELS[src]):
                bad.append((source, target))
    return sorted(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_room_has_a_level():
    rooms = {_room(m) for m in MODULES} - {None}
    assert rooms <= set(LEVELS), f"rooms without a level in LEVELS: {rooms - set(LEVELS)}"


def test_imports_flow_down_the_layers():
    assert upward_imports(_edges()) == []


def test_no_import_cycles():
    assert cycles(_edges()) == []


def test_the_checks_catch_what_they_are_for():
    """The checkers on a doctored graph: an upward import (the model importing the runtime's
    cache), a sideways one (io <-> runtime) and a cycle must all be reported."""
    edges = {k: set(v) for k, v in _edges().items()}
    edges["swiftkv_jax.model.forward"].add("swiftkv_jax.runtime.cache")
    edges["swiftkv_jax.io.loading"].add("swiftkv_jax.runtime.engine")
    edges["swiftkv_jax.runtime.handle"].add("swiftkv_jax.runtime.engine")
    assert ("swiftkv_jax.model.forward", "swiftkv_jax.runtime.cache") in upward_imports(edges)
    assert ("swiftkv_jax.io.loading", "swiftkv_jax.runtime.engine") in upward_imports(edges)
    assert any({"swiftkv_jax.runtime.handle", "swiftkv_jax.runtime.engine"} <= set(c) for c in cycles(edges))


def test_no_module_imports_private_names():
    private = [(str(p.relative_to(PACKAGE)), module, name) for p in sorted(PACKAGE.rglob("*.py"))
               for module, name in _imports(p) if name.startswith("_") and name != "__future__"]
    assert private == []


def test_the_library_does_not_import_its_cli():
    users = [m for m, targets in _edges().items() if _room(m) != "cli"
             and any(_room(t) == "cli" for t in targets)]
    assert users == []


def test_the_http_layer_never_touches_jax():
    """serve/ translates the OpenAI API into engine calls; device work stays in the engine."""
    users = []
    for p in sorted((PACKAGE / "serve").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            users += [(p.name, n) for n in names if n.split(".")[0] in ("jax", "jaxlib", "flax")]
    assert users == []
