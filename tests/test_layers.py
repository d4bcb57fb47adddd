"""The package's own imports, read from the source (ast, nothing imported): no circles, no lower
floor importing a higher one, and no built-in replacement class named outside replacements/.

Floors (docs: /work/shared/DESIGN-NEXT.md, "Layers"), lowest first; a module may import its own
floor and lower ones. prune and distill share a floor and never import each other: what both need
(unit bundles, the Hoyer penalty) sits below them in surgery.units and surgery.sparsity.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: folder -> installed package name (pyproject.toml's package-dir mapping)
PACKAGES = {"surgery": "surgery", "replacements": "surgery.replacements", "recipes": "surgery.recipes"}

FLOORS: list[tuple[str, ...]] = [
    ("surgery.errors", "surgery.sites", "surgery.progress", "surgery._compat"),
    ("surgery.registry", "surgery.inputs", "surgery.models", "surgery.units", "surgery.gguf"),
    ("surgery.locate", "surgery.data", "surgery.data.*", "surgery.replacements", "surgery.replacements.*",
     "surgery.decoding"),
    ("surgery.swap",),
    ("surgery.checkpoint", "surgery.measure", "surgery.sparsity", "surgery.sources"),
    ("surgery.prune", "surgery.prune.*", "surgery.distill", "surgery.distill.*"),
    ("surgery",),  # the public API (surgery/__init__.py): what recipes and integrations build on
    ("surgery.export", "surgery.fast", "surgery.integrations", "surgery.integrations.*"),
    ("surgery.recipes", "surgery.recipes.*"),
    ("surgery.cli", "surgery.cli.*", "surgery.__main__"),
]
#: same floor, but never one importing the other
SEPARATE = [("surgery.prune", "surgery.distill")]
#: the one known crossing, kept visible here until it moves up a floor: prune(recover_steps=...)
#: recovers the pruned model by distillation (one-way; distill never imports prune)
KNOWN_CROSSINGS = {("surgery.prune.engine", "surgery.distill")}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


MODULES = _modules()
_OLD_NAMES = {"replacements": "surgery.replacements", "recipes": "surgery.recipes"}


def _resolve(name: str) -> str | None:
    head = name.split(".")[0]
    if head in _OLD_NAMES:
        name = _OLD_NAMES[head] + name[len(head):]
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    """Modules of the project that ``module`` imports anywhere (top level or inside functions)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # ``from package import submodule`` depends on the submodule, not on the package's __init__
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            resolved = _resolve(name)
            if resolved and resolved != module:
                targets.add(resolved)
    return targets


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _floor(module: str) -> int:
    for index, patterns in enumerate(FLOORS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return index
    raise AssertionError(f"{module} is on no floor: add it to FLOORS in tests/test_layers.py")


def test_every_module_has_a_floor():
    for module in MODULES:
        _floor(module)


def test_no_import_circles():
    index, low, stack, on_stack, circles = {}, {}, [], set(), []
    counter = [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_no_lower_floor_imports_a_higher_one():
    wrong = [f"{m} (floor {_floor(m)}) imports {t} (floor {_floor(t)})"
             for m, targets in GRAPH.items() for t in sorted(targets) if _floor(t) > _floor(m)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("first, second", SEPARATE)
def test_prune_and_distill_do_not_import_each_other(first, second):
    def inside(module, package):
        return module == package or module.startswith(package + ".")

    crossing = [f"{m} imports {t}" for m, targets in GRAPH.items() for t in targets
                if ((inside(m, first) and inside(t, second)) or (inside(m, second) and inside(t, first)))
                and (m, t) not in KNOWN_CROSSINGS]
    assert not crossing, "\n".join(crossing)
    for m, t in KNOWN_CROSSINGS:  # an exception that is gone must leave the list too
        assert t in GRAPH[m], f"{m} no longer imports {t}: remove it from KNOWN_CROSSINGS"


def _builtin_class_names() -> set[str]:
    names = set()
    for module, path in MODULES.items():
        if module.startswith("surgery.replacements"):
            names |= {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)}
    return names


#: surgery.fast is the compatibility module of earlier versions: it re-exports the inference-form
#: classes by name (no isinstance, no attribute use); nothing else outside replacements/ names one
REEXPORTS = {"surgery.fast": {"FastMultiHeadRecurrent", "FastTokenConvolution"}}


def test_no_builtin_replacement_class_is_named_outside_replacements():
    names = _builtin_class_names()
    assert {"MultiHeadLSTM", "MultiHeadGRU", "TokenConvolution"} <= names
    pattern = re.compile(r"\b(" + "|".join(sorted(names)) + r")\b")
    found = []
    for module, path in MODULES.items():
        if module.startswith("surgery.replacements"):
            continue
        allowed = REEXPORTS.get(module, set())
        for number, line in enumerate(path.read_text().splitlines(), 1):
            hits = set(pattern.findall(line)) - allowed
            if hits:
                found.append(f"{path.relative_to(ROOT)}:{number}: {sorted(hits)}")
    assert not found, "\n".join(found)


def test_the_checker_sees_a_planted_circle(tmp_path):
    """The graph code itself: a two-module circle and an upward import are found."""
    a = tmp_path / "a.py"
    a.write_text("from surgery.cli import core\nimport surgery.swap\n")
    targets = _imports("surgery.errors", a)
    assert {"surgery.cli.core", "surgery.swap"} <= targets
    assert any(_floor(t) > _floor("surgery.errors") for t in targets)
