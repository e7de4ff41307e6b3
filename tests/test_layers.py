"""The package reads top to bottom: each module imports jetfast only from its own layer or
the layers before it (the order of the README's layout), never from a later stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jetfast"

# In pipeline order; a module may import from its own layer and every earlier one.
LAYERS = [
    ("jetfast", "jetfast._ext", "jetfast._C", "jetfast.errors"),
    ("jetfast.run",),
    ("jetfast.distributed",),
    ("jetfast.ops", "jetfast.kernels"),
    ("jetfast.bins",),
    ("jetfast.data",),
    ("jetfast.sim",),
    ("jetfast.models",),
    ("jetfast.latent",),
    ("jetfast.generation",),
    ("jetfast.evaluate",),
    ("jetfast.train",),  # a trainer judges its epochs by the jets it generates (train/fidelity.py)
    ("jetfast.cli",),
]


def layer(module: str) -> int:
    """The layer of a dotted module name: its longest listed prefix."""
    best, rank = "", None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, rank = prefix, index
    assert rank is not None, f"{module} is in no layer: add it to LAYERS (and to the README's layout)"
    return rank


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def jetfast_imports(path: Path):
    """Every jetfast module ``path`` imports, at module level or inside functions."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.split(".")[0] == "jetfast")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jetfast":
            for alias in node.names:  # `from jetfast import ops` imports the module jetfast.ops
                yield f"{node.module}.{alias.name}" if node.module == "jetfast" and alias.name != "__version__" else node.module


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_imports_point_back_up_the_pipeline(path):
    name = module_name(path)
    late = [imported for imported in jetfast_imports(path) if layer(imported) > layer(name)]
    assert not late, f"{name} imports {late}, from later stages of the pipeline"
