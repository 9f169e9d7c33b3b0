"""The package's layering: no module imports another's private names, and the library never
imports its command line (cli.py sits on top of it, not under it)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "swiftkv_jax"


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) for every `from .X import name` of the package's own modules, at any depth
    (gguf_io reads one private table of transformers', guarded by a fallback: not ours to change)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("swiftkv_jax")):
            out += [(node.module or "", alias.name) for alias in node.names]
    return out


def test_no_module_imports_private_names():
    private = [(p.name, module, name) for p in sorted(PACKAGE.rglob("*.py"))
               for module, name in _imports(p) if name.startswith("_") and name != "__future__"]
    assert private == []


def test_the_library_does_not_import_its_cli():
    users = [p.name for p in sorted(PACKAGE.rglob("*.py")) if p.name != "cli.py"
             and any(module.split(".")[-1] == "cli" for module, _ in _imports(p))]
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
