"""rose/ imports form no cycle: every module can be understood (and imported) after the ones it uses.

The graph is read from the source, not from an import: every `import` and
`from ... import` of a rose module, at module level or inside a function (a lazy
import that only hides a cycle is still one), except those under
`if TYPE_CHECKING:`, which never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROSE = Path(__file__).resolve().parents[1] / "rose"


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:` blocks."""
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                hidden.update(id(n) for n in ast.walk(child))
    return hidden


def import_graph(root: Path = ROSE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (`root`: the package directory)."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        hidden = _type_checking_nodes(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in hidden:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                while target and target not in files:  # `from pkg import function`
                    target = target.rpartition(".")[0]
                # a submodule import runs its packages' __init__ first (a module inside a
                # package is imported by that package's own __init__: not an edge back)
                while target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
                    target = target.rpartition(".")[0]
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_rose_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_a_cycle_closed_by_a_lazy_import_is_found_and_type_checking_imports_are_not(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from pkg.sub import c\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text("from .. import a\n")
    (package / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
    )
    (package / "e.py").write_text("import pkg.d\n")
    graph = import_graph(package)
    assert graph["pkg.b"] == {"pkg.sub", "pkg.sub.c"} and graph["pkg.d"] == set()
    assert graph["pkg.e"] == {"pkg.d"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


# the modules that combine stage records: they must not know any stage by name
GENERIC = ("plan.py", "runner.py", "resources.py", "preflight.py")
ALIASES = {"evaluate"}  # resources: an older spelling of a `resources:` config key


def stage_names_in(path: Path, stages: set[str]) -> list[str]:
    """String constants of a module that name a stage."""
    return sorted(
        node.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value in stages
    )


def test_scheduling_drivers_and_estimators_switch_on_no_stage_name():
    """Each stage is described by its record beside its function; plan, runner, resources and
    pre-flight only read records (the rules name their own stage)."""
    from rose.stages import STAGES

    stages = set(STAGES) - ALIASES
    found = {name: stage_names_in(ROSE / name, stages) for name in GENERIC}
    assert found == {name: [] for name in GENERIC}


def test_the_stage_name_check_sees_a_stage_name(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('def f(stage):\n    return stage == "prune"\n')
    assert stage_names_in(module, {"prune", "order"}) == ["prune"]
