"""The package's layers call only downward: contract <- wire <- bus (and modes) <- tools.

Read from the import statements of every module (with ``ast``), so a new
upcall fails here rather than in a reviewer's head.  The test doubles in
``tests/support`` are never imported by the product.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: layer of each package -> the layers it may import from (besides itself)
ALLOWED = {
    "kmlbus.contract": set(),
    "kmlbus.wire": {"kmlbus.contract"},
    "modes": {"kmlbus.contract", "kmlbus.wire"},
    "kmlbus.bus": {"kmlbus.contract", "kmlbus.wire", "modes"},
    "kmlbus.testing": {"kmlbus.contract", "kmlbus.wire", "modes"},
    "kmlbus.tools": {"kmlbus.contract", "kmlbus.wire", "modes", "kmlbus.bus", "kmlbus.vm", "kmlbus.testing"},
    "kmlbus.vm": set(),
}


def _layer(module: str) -> str | None:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def _imports(path: Path, package: str) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _modules() -> list[tuple[str, Path]]:
    out = []
    for top in ("kmlbus", "modes"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            out.append((".".join(rel.parts), path))
    return out


@pytest.mark.parametrize("module,path", _modules(), ids=[m for m, _ in _modules()])
def test_a_module_imports_only_from_its_own_layer_and_those_below(module: str, path: Path) -> None:
    own = _layer(module)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    bad = []
    for imp in _imports(path, package):
        if imp.startswith("tests"):
            bad.append(f"{imp} (a test double)")
            continue
        layer = _layer(imp)
        if own is None or layer is None or layer == own:
            continue
        if layer not in ALLOWED[own]:
            bad.append(f"{imp} (layer {layer})")
    assert not bad, f"{module} (layer {own}) imports upward or sideways: {sorted(set(bad))}"


def test_the_layer_check_sees_an_upcall(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("from kmlbus.bus import daemon\nfrom . import codec\n")
    found = _imports(f, "kmlbus.wire")
    assert "kmlbus.bus.daemon" in found and "kmlbus.wire.codec" in found
    assert _layer("kmlbus.bus.daemon") == "kmlbus.bus" not in ALLOWED["kmlbus.wire"]
