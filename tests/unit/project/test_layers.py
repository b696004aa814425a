"""The package's floors: every import inside `sclslt` goes to its own floor or one below,
no two subpackages import each other, and only the runtime floor imports deepspeed.

Read statically from the source (module-level and function-level imports alike), so a lazy import
inside a function cannot hide an upward dependency. Config strings that name an implementation go
through `sclslt.registry`, which imports its home module by name (the plugin seam), not statically.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PKG = ROOT / "sclslt"

# bottom to top; the base floor's modules import each other, a module any module of a lower floor
FLOORS = [
    {"sclslt.atomic", "sclslt.registry", "sclslt.config"},
    {"sclslt.data"},
    {"sclslt.model"},
    {"sclslt.runtime"},
    {"sclslt.eval"},
    {"sclslt.selection"},
    {"sclslt.train"},
    {"sclslt.cli", "sclslt"},  # the entry points: the command, and `from sclslt import SignTranslator`
]


def unit(module: str) -> str:
    """The unit a module belongs to: its subpackage, or the top-level module itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def floor(module: str) -> int:
    for i, units in enumerate(FLOORS):
        if unit(module) in units:
            return i
    raise AssertionError(f"{module}: on no floor of tests/unit/project/test_layers.py (add its unit to FLOORS)")


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def modules() -> dict[str, set[str]]:
    return {
        ".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): imports(p)
        for p in sorted(PKG.rglob("*.py"))
    }


def test_every_import_goes_to_the_same_floor_or_below():
    upward = [
        f"{m} (floor {floor(m)}) imports {i} (floor {floor(i)})"
        for m, deps in modules().items()
        for i in deps
        if i.startswith("sclslt.") and floor(i) > floor(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_loop_between_subpackages():
    edges = {}
    for m, deps in modules().items():
        for i in deps:
            if i.startswith("sclslt.") and unit(i) != unit(m):
                edges.setdefault(unit(m), set()).add(unit(i))
    loops = [f"{a} <-> {b}" for a, bs in edges.items() for b in bs if a in edges.get(b, set())]
    assert not loops, loops


def test_only_the_runtime_floor_imports_deepspeed():
    users = sorted(m for m, deps in modules().items() if any(d.split(".")[0] == "deepspeed" for d in deps))
    assert users and all(unit(m) == "sclslt.runtime" for m in users), users


def test_the_floor_check_catches_an_upward_import(tmp_path):
    """Mutation: the check sees a function-level import of the training loop from evaluation."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from sclslt.train.run import run\n")
    deps = imports(f)
    assert deps == {"sclslt.train.run"} and floor("sclslt.train.run") > floor("sclslt.eval.evaluation")


def module_imports(m: str, mods: dict[str, set[str]]) -> set[str]:
    """The package's modules `m` imports: `imports` plus the submodules named by `from package import module`."""
    path = PKG.parent.joinpath(*m.split(".")).with_suffix(".py")
    if not path.is_file():
        path = PKG.parent.joinpath(*m.split("."), "__init__.py")
    out = {d for d in mods[m] if d in mods}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods}
    return out


def test_no_import_cycle_between_modules():
    """No module of the package imports itself back through others (module-level and function-level imports
    alike, so a lazy import cannot hide a cycle inside a floor). Mutation caught (checked): re-adding the
    import `from sclslt.model.heads import masked_mean` in sclslt/model/close_text.py's `text_embeddings`
    makes it fail naming the cycle `sclslt.model.heads -> sclslt.model.close_text -> sclslt.model.heads`
    (so do the function-level imports `sclslt.eval.translate` in hub.py and `sclslt.runtime.context` in rundir.py)."""
    mods = modules()
    graph = {m: sorted(d for d in module_imports(m, mods) if d != m) for m in mods}
    cycles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d) :] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
