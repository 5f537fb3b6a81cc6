"""The import rule (docs: README "Where things live"): imports flow one way,

    cli (and the package facade ``wtours/__init__``) -> commands / api -> pipeline / bench -> stages -> train
        -> report -> eval / objectives / models -> video -> config / errors / fsutil / integrity / figures

checked on the source with :mod:`ast`, function-level imports included, so the layering cannot silently regress.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "wtours"

#: top-level part of the package -> its layer (a part imports only parts of its own layer or below)
LAYERS = {
    "config": 0, "errors": 0, "fsutil": 0, "integrity": 0, "resources": 0, "rundir": 0, "figures": 0,
    "video": 1,
    "models": 2, "objectives": 2, "eval": 2, "_timm_registry": 2,
    "report": 3,
    "train": 4,
    "stages": 5,
    "pipeline": 6, "bench": 6,
    "commands": 7, "api": 7,
    "cli": 8,
    "__init__": 8,  # the package facade: the lazy Python API and the timm registration hook; only cli imports it
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ``wtours.*`` module ``path`` imports, at any depth (function-level imports too)."""
    tree = ast.parse(path.read_text(), str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "wtours")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "wtours":
                continue
            out.add(mod)
            for a in node.names:  # ``from wtours.pipeline import run``: the submodule
                if (ROOT.parent / Path(*mod.split("."), a.name + ".py")).is_file() or \
                        (ROOT.parent / Path(*mod.split("."), a.name)).is_dir():
                    out.add(f"{mod}.{a.name}")
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}


GRAPH = _graph()


def test_every_part_has_a_layer():
    assert {_part(m) for m in GRAPH} <= set(LAYERS), sorted({_part(m) for m in GRAPH} - set(LAYERS))


def test_imports_flow_one_way():
    bad = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in sorted(targets)
           if LAYERS.get(_part(t), 99) > LAYERS[_part(m)]]
    assert not bad, "upward imports:\n" + "\n".join(bad)


@pytest.mark.parametrize("low", ["objectives", "models"])
def test_objectives_and_models_import_nothing_above_them(low):
    allowed = {"__init__", "config", "errors", "fsutil", "integrity", "models", "objectives"}
    bad = [f"{m} -> {t}" for m, targets in GRAPH.items() if _part(m) == low for t in targets
           if _part(t) not in allowed]
    assert not bad, bad


def test_objectives_never_import_lightning():
    bad = []
    for p in (ROOT / "objectives").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{p.name}: {n}" for n in names if n.split(".")[0] in ("lightning", "pytorch_lightning")]
    assert not bad, bad


def test_stages_never_import_pipeline_or_commands():
    bad = [f"{m} -> {t}" for m, targets in GRAPH.items() if _part(m) == "stages" for t in targets
           if _part(t) in ("pipeline", "bench", "commands", "cli")]
    assert not bad, bad


def test_a_stage_never_imports_another_stage():
    """What both stages use (augmentation primitives, heads, the engine) lives below them, not in one of them."""
    def stage(m: str) -> str | None:
        parts = m.split(".")
        return parts[2] if len(parts) > 2 and parts[1] == "stages" else None

    bad = [f"{m} -> {t}" for m, targets in GRAPH.items() if stage(m) for t in targets
           if stage(t) and stage(t) != stage(m)]
    assert not bad, bad


def test_library_never_imports_the_cli():
    bad = [f"{m} -> {t}" for m, targets in GRAPH.items() if _part(m) not in ("cli", "commands") for t in targets
           if _part(t) in ("cli", "commands")]
    assert not bad, bad


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_cycle_among_top_level_parts():
    edges: dict[str, set[str]] = {}
    for m, targets in GRAPH.items():
        edges.setdefault(_part(m), set()).update(_part(t) for t in targets if _part(t) != _part(m))
    assert not _cycles(edges)


def test_no_cycle_among_modules():
    # a package's __init__ importing its own submodules is not a cycle worth naming
    edges = {m: {t for t in targets if t in GRAPH and not m.startswith(t + ".")} for m, targets in GRAPH.items()}
    assert not _cycles(edges)
