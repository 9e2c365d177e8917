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


# ------------------------------------------------------------------ the import graph
MAX_MODULE_LINES = 450
# which rooms a room may import: every arrow points down, towards the floor
LAYERS = {
    "_core": set(),
    "prediction": {"_core"},
    "experts": {"_core", "prediction"},
    "gates": {"_core", "prediction"},
    "fitting": {"_core", "prediction", "experts", "gates"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the moekit modules it imports (anywhere in its body), packages'
    ``__init__`` re-exports left out: a package importing its children is no circle."""
    paths = {_module_name(p): p for p in SRC.rglob("*.py")}
    packages = {m for m, p in paths.items() if p.name == "__init__.py"}

    def resolve(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in paths.items():
        if mod in packages:
            continue
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".")[: -node.level]
                    base = ".".join([*pkg, base] if base else pkg)
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        resolved = {resolve(t) for t in targets if t.startswith("moekit")}
        graph[mod] = {r for r in resolved if r and r != mod and r not in packages}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_anywhere():
    assert _cycles(_import_graph()) == []


@pytest.mark.parametrize("room", sorted(LAYERS))
def test_every_arrow_points_down(room):
    allowed = LAYERS[room] | {room}
    for mod, targets in _import_graph().items():
        if _room_of(mod) != room:
            continue
        bad = {t for t in targets if _room_of(t) not in allowed}
        assert not bad, f"{mod} imports {bad}"


def test_no_module_is_over_the_size_limit():
    sizes = {p.relative_to(SRC): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    big = {str(p): n for p, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"
