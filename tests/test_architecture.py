"""The two rooms never import each other; the shared floor imports neither.

The statistical room (experts, gates, fitting, estimators) and ``moekit.nn`` both
stand on ``moekit._core`` and ``moekit.prediction``. This test reads every module's
imports with ``ast`` so that it also catches imports inside functions.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "moekit"
STATISTICAL = ("experts", "gates", "fitting", "estimators")
FLOOR = ("_core", "prediction")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            # relative imports resolve inside the same package; resolve them by hand
            pkg = path.relative_to(SRC.parent).with_suffix("").parts[: -node.level]
            names.add(".".join((*pkg, node.module or "")).rstrip("."))
    return names


def _room_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "moekit" or len(parts) < 2:
        return None
    return parts[1]


def _modules(room: str):
    base = SRC / room
    return sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]


@pytest.mark.parametrize("room", STATISTICAL)
def test_statistical_room_does_not_import_nn(room):
    for path in _modules(room):
        bad = {m for m in _imports(path) if _room_of(m) == "nn"}
        assert not bad, f"{path.relative_to(SRC)} imports {bad}"


def test_nn_does_not_import_statistical_room():
    for path in _modules("nn"):
        bad = {m for m in _imports(path) if _room_of(m) in STATISTICAL}
        assert not bad, f"{path.relative_to(SRC)} imports {bad}"


@pytest.mark.parametrize("floor", FLOOR)
def test_floor_imports_neither_room(floor):
    for path in _modules(floor):
        if not path.exists():
            continue
        bad = {m for m in _imports(path) if _room_of(m) in (*STATISTICAL, "nn", "estimators")}
        assert not bad, f"{path.relative_to(SRC)} imports {bad}"


@pytest.mark.parametrize("room", ("experts", "gates"))
def test_families_do_not_import_upwards(room):
    # families stand on the floor; the EM loop and the estimators ask them, never the reverse
    for path in _modules(room):
        bad = {m for m in _imports(path) if _room_of(m) in ("fitting", "estimators")}
        assert not bad, f"{path.relative_to(SRC)} imports {bad}"


def test_nn_imports_without_the_statistical_stack():
    code = (
        "import sys, moekit.nn; "
        "print(sorted(m for m in ('sklearn', 'pandas', 'scipy', 'moekit.estimators') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
