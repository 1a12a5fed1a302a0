"""The dependency direction of DESIGN.md §1, read from the source: no import loop anywhere (module-level,
function-level, TYPE_CHECKING and ``importlib.import_module("...")`` imports all count), ``fedcmd_core``
and ``protocols`` import nothing of ours outside themselves (neither imports the other), ``edge_agent``
never imports ``cloud``, and only the simulation and deploy modules of ``cloud`` import ``edge_agent``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cloud", "edge_agent", "fedcmd_core", "protocols")
# cloud modules that may import the device side: the simulations (cloud/sim) run real agents in-process, and
# the deploy tools read the agent's own profile table (memory limits) to render its unit and check the inventory.
def _may_import_edge(module: str) -> bool:
    return module.startswith("cloud.sim.") or module in ("cloud.deploy.inventory", "cloud.deploy.systemd_units")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imported(module: str, path: Path, known: set[str]) -> set[str]:
    """Every module of ours that ``module`` imports, anywhere in the file."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        elif (isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        for name in names:
            # `import a.b.c` needs a, a.b and a.b.c: the longest known prefix is the dependency
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imported(m, p, set(mods)) for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
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
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_planted_loop() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_sees_every_kind_of_import() -> None:
    graph = _graph()
    assert "fedcmd_core.strategies.base" in graph["fedcmd_core.strategies.fedavg"]  # from-import
    assert "fedcmd_core.data.partition_args" in graph["fedcmd_core.data.natural"]  # under TYPE_CHECKING
    assert "fedcmd_core.data.synthetic" in graph["fedcmd_core.data.datasets"]  # inside a function


def test_no_import_loops() -> None:
    assert _cycles(_graph()) == []


def test_the_dependency_direction() -> None:
    wrong = []
    for module, deps in _graph().items():
        top = module.split(".")[0]
        for dep in deps:
            other = dep.split(".")[0]
            if top in ("fedcmd_core", "protocols") and other != top:
                wrong.append(f"{module} -> {dep} ({top} imports nothing of ours outside itself)")
            if top == "edge_agent" and other == "cloud":
                wrong.append(f"{module} -> {dep} (the device side never imports the cloud)")
            if top == "cloud" and other == "edge_agent" and not _may_import_edge(module):
                wrong.append(f"{module} -> {dep} (only the simulations import the device side)")
    assert wrong == []
