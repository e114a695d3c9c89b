"""The package's modules form layers that point one way: a module imports only modules of its own layer or of
layers before it, and no two modules import each other, even through imports inside functions.

The layers, bottom first: helpers (errors, registry, io, hf, leftovers, modelcache, console) < data (and
defaults, and the spec of every setting) <
models (and families) < capture < methods (the scoring methods, greedy generation, chance baselines, statistics,
attention rows) < experiments (results, the results-dir lock, the records of a unit, detect) <
sweep and engines (the sweep package with its Ray engine, ablation, export) < report < commands and the CLI < the
package's own ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path


PACKAGE = "retrieval_heads"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE

LAYERS: list[tuple[str, set[str]]] = [
    ("helpers", {"errors", "registry", "io", "hf", "leftovers", "modelcache", "console"}),
    ("data", {"data", "defaults", "spec", "claims"}),
    ("models", {"models", "families"}),
    ("capture", {"capture", "eager_rows"}),
    ("methods", {"stats", "methods", "generation", "prefill", "chance", "onepass"}),
    ("experiments", {"results", "attention", "attention_capture", "lock", "records", "experiments"}),
    ("sweep and engines", {"sweep", "ablation", "ablation_measure", "ablation_stats", "export"}),
    ("report", {"report"}),
    ("commands", {"commands", "cli", "__main__"}),
    ("package", {""}),  # retrieval_heads/__init__.py: the public API
]
LAYER_OF = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}

# Names taken from the package's own __init__ that are not modules and that any layer may read (the
# package is always imported before any of its modules).
PACKAGE_NAMES = {"__version__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """The first component below the package ('' for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def is_module(module: str) -> bool:
    rel = Path(*module.split(".")[1:]) if "." in module else Path()
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel).is_dir()


def internal_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of a module of this package in ``path``, at any depth (module level,
    inside functions, under ``if TYPE_CHECKING``)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for a in node.names:  # `from . import stats` imports a module, `from . import __version__` a name
                sub = f"{target}.{a.name}"
                if is_module(sub):
                    found.append((node.lineno, sub))
                elif not (target == PACKAGE and a.name in PACKAGE_NAMES):
                    found.append((node.lineno, target))
    return sorted(set(found))


def modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py"))


def graph() -> dict[str, list[tuple[int, str]]]:
    return {module_name(p): internal_imports(p) for p in modules()}


def upward_imports(edges: dict[str, list[tuple[int, str]]]) -> list[str]:
    bad = []
    for me, imports in edges.items():
        mine = LAYER_OF[unit_of(me)]
        for line, target in imports:
            theirs = LAYER_OF[unit_of(target)]
            if theirs > mine:
                bad.append(f"{me}:{line} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    return bad


def unit_cycles(edges: dict[str, list[tuple[int, str]]]) -> list[str]:
    """Pairs of top-level units (modules, or subpackages as a whole) that import each other, directly or
    through others of their layer."""
    units: dict[str, set[str]] = {}
    for me, imports in edges.items():
        for _, target in imports:
            a, b = unit_of(me), unit_of(target)
            if a != b:
                units.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            u = todo.pop()
            if u == goal:
                return True
            if u not in seen:
                seen.add(u)
                todo += units.get(u, ())
        return False

    return sorted({f"{min(a, b)} <-> {max(a, b)}" for a in units for b in units[a] if reaches(b, a)})


def test_every_module_has_a_layer():
    missing = sorted({unit_of(m) for m in graph()} - set(LAYER_OF))
    assert not missing, f"modules without a layer in tests/test_layers.py: {missing}"


def test_no_module_imports_a_later_layer():
    bad = upward_imports(graph())
    assert not bad, "imports that run back up the layers:\n" + "\n".join(bad)


def test_no_two_units_import_each_other():
    bad = unit_cycles(graph())
    assert not bad, "units that import each other:\n" + "\n".join(bad)


def private_imports(path: Path) -> list[str]:
    """``from X import _name`` where X is another unit of the package: a private name used across units."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            target = ".".join(base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))
            if unit_of(target) != unit_of(me):
                bad += [f"{me}:{node.lineno} imports {target}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    return bad


def test_no_private_name_crosses_units():
    bad = [b for p in modules() for b in private_imports(p)]
    assert not bad, "private names imported from another unit:\n" + "\n".join(bad)


def test_the_parser_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: a function-level relative import of a later layer is found, with its line."""
    edges = {"retrieval_heads.models": [(7, "retrieval_heads.results")],
             "retrieval_heads.generation": [(3, "retrieval_heads.methods.base")],
             "retrieval_heads.methods.retrieval_score": [(9, "retrieval_heads.generation")]}
    assert upward_imports(edges) == [
        "retrieval_heads.models:7 (models) imports retrieval_heads.results (experiments)"]
    assert unit_cycles(edges) == ["generation <-> methods"]
    imports = internal_imports(ROOT / "results.py")
    assert all(t != PACKAGE for _, t in imports)  # `from . import __version__` is a name, not a layer
    assert (ROOT / "chance.py").exists() and any(t == f"{PACKAGE}.stats" for _, t in internal_imports(ROOT / "chance.py"))
