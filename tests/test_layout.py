"""The package layout stays readable: read every module's imports (with ``ast``, nothing is executed)
and fail on an import cycle, on a private name taken from another module, or on a lower layer that
imports an upper one. docs/architecture.md describes the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own layer and those below it, never one above. Within a
# package every module has the package's layer, except its stage module(s), which are one layer up:
# they register with irm.run. The pipeline, the CLI and the torchrun entry sit on top.
LAYERS: list[tuple[str, ...]] = [
    ("irm.core", "irm.resources"),
    ("irm.data", "irm.rewards"),
    ("irm.models",),
    ("irm.llm", "irm.activations", "probes"),
    ("irm.pair", "irm.implicit", "irm.features", "irm.contrastive"),
    ("irm.run",),
    ("<stage>",),
    ("irm.run.pipeline", "irm.run.distributed", "irm.analysis", "irm.cli"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for root in ("irm", "probes"):
        for p in sorted((REPO / root).rglob("*.py")):
            parts = list(p.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


MODULES = _modules()


def _is_stage_module(mod: str) -> bool:
    return mod.rsplit(".", 1)[-1] in ("stage", "stages") or mod == "irm.run.report"


def layer_of(mod: str) -> int:
    if _is_stage_module(mod):
        return next(i for i, names in enumerate(LAYERS) if "<stage>" in names)
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (mod == n or mod.startswith(n + ".")) and len(n) > best_len:
                best, best_len = i, len(n)
    if best is None:
        raise AssertionError(f"{mod} is in no layer of tests/test_layout.py; add its package to LAYERS "
                             "and a paragraph to docs/architecture.md.")
    return best


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[mod].name == "__init__.py"
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _target(name: str) -> str | None:
    """The module of ours that an imported dotted name lives in (None: a third-party import)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines of ``if TYPE_CHECKING:`` blocks: imports for annotations only, never executed."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports() -> list[tuple[str, str, str | None, int, bool]]:
    """(importer, imported module, name taken from it or None, line, runtime) for every import of
    ours; ``runtime`` is False for an import under ``if TYPE_CHECKING:``. Imports inside functions count."""
    out = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        typing_only = _type_checking_lines(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if (t := _target(a.name)) is not None:
                        out.append((mod, t, None, node.lineno, node.lineno not in typing_only))
            elif isinstance(node, ast.ImportFrom):
                src = _resolve(mod, node)
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    runtime = node.lineno not in typing_only
                    if sub in MODULES:  # `from irm.llm import local`: the submodule itself
                        out.append((mod, sub, None, node.lineno, runtime))
                    elif (t := _target(src)) is not None:
                        out.append((mod, t, a.name, node.lineno, runtime))
    return out


IMPORTS = imports()


def test_the_walk_sees_the_imports():
    # A guard against a test that passes because it reads nothing.
    assert len(MODULES) > 60 and len(IMPORTS) > 200
    assert ("irm.run.pipeline", "irm.run.registry", "RunContext") in {i[:3] for i in IMPORTS}
    assert ("irm.run.registry", "irm.run.config", "ExperimentConfig", False) in {(*i[:3], i[4]) for i in IMPORTS}


def test_no_private_name_is_taken_from_another_module():
    bad = [f"{m}:{line} takes {n} from {t}" for m, t, n, line, _ in IMPORTS
           if n and n.startswith("_") and not n.startswith("__") and t != m]
    assert not bad, "private names crossing modules (make them public or move them):\n" + "\n".join(bad)


def test_no_lower_layer_imports_an_upper_one():
    bad = [f"{m}:{line} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})" for m, t, _, line, _ in IMPORTS
           if t != m and not m.startswith(t + ".") and layer_of(t) > layer_of(m)]
    assert not bad, "imports against the layering of docs/architecture.md:\n" + "\n".join(bad)


def test_probes_import_nothing_from_irm():
    bad = [f"{m}:{line} imports {t}" for m, t, _, line, _ in IMPORTS if m.startswith("probes") and t.startswith("irm")]
    assert not bad, bad


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
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


def test_no_import_cycle():
    edges: dict[str, set[str]] = {}
    for m, t, _, _, runtime in IMPORTS:
        # A package's __init__ re-exporting its own modules is no cycle; a module importing its own
        # package's __init__ would be, and counts. Imports for annotations only (TYPE_CHECKING) run never.
        if runtime and t != m and not t.startswith(m + "."):
            edges.setdefault(m, set()).add(t)
    cycles = _cycles(edges)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("edges, n", [({"a": {"b"}, "b": {"a"}}, 1), ({"a": {"b"}, "b": {"c"}}, 0),
                                      ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, 1)])
def test_the_cycle_finder_finds_cycles(edges, n):
    assert len(_cycles(edges)) == n


def test_the_stage_modules_are_the_registered_ones():
    from irm.run.registry import STAGE_MODULES

    assert set(STAGE_MODULES) == {m for m in MODULES if _is_stage_module(m)}
