"""The layers point one way: benchmarks/analysis -> engine -> recipe -> methods -> models/losses/loaders ->
a bottom of modules that import nothing of the project (errors, io, faults, tracing)."""
import ast
from pathlib import Path

import pytest

from conftest import REPO

BOTTOM = {"fasttrain.errors", "fasttrain.files", "fasttrain.faults", "fasttrain.tracing"}
# a module may import only from the layers listed for its own (and the bottom)
BELOW = {
    "fasttrain.models": set(), "fasttrain.losses": set(), "fasttrain.monitors": set(), "loaders": set(),
    "fasttrain.methods": {"fasttrain.losses", "fasttrain.models", "fasttrain.monitors"},
    "fasttrain.recipe": {"fasttrain.methods", "fasttrain.losses", "fasttrain.models", "fasttrain.monitors", "loaders"},
}


def imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, at any depth of the file (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        found |= {n for n in names if n.split(".")[0] in ("fasttrain", "loaders", "benchmarks")}
    return found


def layer(module: str) -> str:
    for name in sorted(BELOW, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return module


@pytest.mark.parametrize("path", sorted((REPO / "fasttrain").rglob("*.py")) + sorted((REPO / "loaders").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down(path):
    module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    found = imports(path)
    if module in BOTTOM:
        assert not found - BOTTOM, f"{module} is the bottom layer but imports {found - BOTTOM}"
        return
    own = layer(module)
    if own not in BELOW:
        return  # engine, analysis, the CLIs: above everything listed
    allowed = BELOW[own] | BOTTOM | {own}
    wrong = {m for m in found if layer(m) not in allowed and m not in allowed}
    assert not wrong, f"{module} imports {sorted(wrong)}, which are not below it"
