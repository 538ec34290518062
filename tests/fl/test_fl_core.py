"""The engine-neutral core: engines stand side by side (no engine imports another), and the in-process loop
gives the numbers it gave before the core existed."""

import ast
import json
import os

import pytest

from spafl_fl import RunConfig
from spafl_fl.algorithms import ALGORITHMS
from spafl_fl.simulation import TIMING_KEYS, Simulation

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "python", "spafl_fl")
ENGINES = {"simulation": "simulation.py", "flower": "flower.py", "deploy": "deploy.py", "flower_app": "flower_app"}
"""The in-process loop, Flower's simulation engine, the deployment, and the one Flower app both Flower engines run."""
MAY_USE = {"simulation": set(), "flower": {"flower_app"}, "deploy": {"flower_app"}, "flower_app": set()}


def module_name(path: str) -> str:
    """``flower_app.client`` for python/spafl_fl/flower_app/client.py; ``spafl_fl`` for the package itself."""
    parts = os.path.relpath(path, PACKAGE).removesuffix(".py").split(os.sep)
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(parts) or "spafl_fl"


def _is_module(parts: list[str]) -> bool:
    where = os.path.join(PACKAGE, *parts)
    return os.path.isfile(where + ".py") or os.path.isfile(os.path.join(where, "__init__.py"))


def module_imports(path: str) -> set[str]:
    """The spafl_fl modules a file imports, by their dotted names inside the package (``spafl_fl`` for the package
    itself), at module level or inside functions, relative or absolute: ``from .x import name`` is module ``x``,
    ``from . import x`` or ``from .p import x`` is ``x`` or ``p.x`` where that is a module. A module of a
    subpackage imported from outside it also runs the subpackage's ``__init__``, so that counts too."""
    with open(path) as f:
        tree = ast.parse(f.read())
    here = os.path.relpath(path, PACKAGE).split(os.sep)[:-1]  # the package the file sits in
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "spafl_fl":
                base = node.module.split(".")[1:]
            else:
                continue
            found.update(".".join([*base, a.name]) if _is_module([*base, a.name]) else ".".join(base)
                         for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("spafl_fl."))
    found = {name or "spafl_fl" for name in found}
    for name in list(found):
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts)) if parts[:i] != here[:i])
    return found - {module_name(path)}


def imported_modules(path: str) -> set[str]:
    """The spafl_fl modules a file imports (relative or absolute), by their first name inside the package."""
    return {name.split(".")[0] for name in module_imports(path)}


def import_graph() -> dict[str, set[str]]:
    """Every module of python/spafl_fl and the modules it imports."""
    graph = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                graph[module_name(path)] = module_imports(path)
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the modules along it (first == last), or None when it has none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for used in sorted(graph.get(module, ())):
            cycle = visit(used)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module))), None)


def engine_files(engine: str) -> list[str]:
    path = os.path.join(PACKAGE, ENGINES[engine])
    if os.path.isdir(path):
        return [os.path.join(path, name) for name in sorted(os.listdir(path)) if name.endswith(".py")]
    return [path]


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_no_engine_imports_another(engine):
    others = set(ENGINES) - {engine} - MAY_USE[engine]
    for path in engine_files(engine):
        used = imported_modules(path) & others
        assert not used, f"{os.path.relpath(path, PACKAGE)} imports {sorted(used)}"


def test_the_import_check_sees_relative_imports():
    path = os.path.join(PACKAGE, "flower_app", "strategy.py")
    assert {"core", "recorder", "algorithms"} <= imported_modules(path)
    assert {"core", "flower_app.messages", "flower_app.persist"} <= module_imports(path)
    # flower.py imports flower_app.server inside a function: that runs flower_app/__init__.py too
    flower = module_imports(os.path.join(PACKAGE, "flower.py"))
    assert {"flower_app", "flower_app.server", "flower_app.client"} <= flower


def test_no_module_of_the_package_imports_itself_round_a_circle():
    """No import cycle at all among the modules of spafl_fl, lazy imports inside functions included."""
    graph = import_graph()
    assert {"cli", "reproduce", "simulation", "flower_app", "flower_app.strategy", "spafl_fl"} <= set(graph)
    assert import_cycle(graph) is None, " -> ".join(import_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_every_algorithm_is_registered_once_and_runs():
    assert set(ALGORITHMS) == {"spafl", "fedavg", "local"}


REGRESSION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "regression")
NEW_KEYS = {"rejected_evaluations", "uplink_wire_bits", "downlink_wire_bits", "client_compute_seconds",
            "client_cpu_seconds"}


@pytest.mark.parametrize("name", ["spafl-lazy", "spafl-eager", "fedavg-lazy", "local-lazy"])
def test_run_gives_the_numbers_it_gave_before_the_core(name, monkeypatch):
    """metrics.jsonl of ``spafl-fl run --dataset digits --model mlp --clients 3 --sample 2 --rounds 2 --local-epochs 1
    --seed 5 --threads 1 --no-baseline --classifier sparse --client-optimizer fresh --algorithm A --global-update U``
    as written before the
    engine-neutral core (SPAFL_CPU_PATH=skip): every field but the timings is the same, and the records only gained
    the keys every engine now shares (what Flower carried: null here)."""
    monkeypatch.setenv("SPAFL_CPU_PATH", "skip")
    algorithm, update = name.split("-")
    config = RunConfig(dataset="digits", model="mlp", clients=3, sample=2, rounds=2, local_epochs=1, seed=5,
                       threads=1, measure_baseline=False, algorithm=algorithm, global_update=update,
                       classifier="sparse", client_optimizer="fresh")
    sim = Simulation(config)
    sim.run()
    with open(os.path.join(REGRESSION, f"{name}.jsonl")) as f:
        before = [json.loads(line) for line in f]
    for got, want in zip(sim.records, before, strict=True):
        assert set(got) - set(want) == NEW_KEYS and set(want) <= set(got)
        assert {k: v for k, v in got.items() if k in want and k not in TIMING_KEYS} == {
            k: v for k, v in want.items() if k not in TIMING_KEYS}
        assert got["rejected_evaluations"] == [] and all(got[k] is None for k in NEW_KEYS - {"rejected_evaluations"})


def test_plots_leave_the_matplotlib_backend_alone(tmp_path):
    """Library code draws through Figure + FigureCanvasAgg: a notebook's chosen backend stays chosen."""
    import matplotlib

    from spafl_fl.plots import plot_runs

    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        record = {"round": 1, "accuracy": 50.0, "density": {"total": 0.5}, "mean_row_density": 0.5,
                  "uplink_bits": 8, "downlink_bits": 8, "dense_uplink_bits": 80, "train_seconds": 1.0,
                  "baseline_train_seconds": 2.0}
        paths = plot_runs([("run", [record])], str(tmp_path))
        assert len(paths) == 4 and all(os.path.getsize(p) > 0 for p in paths)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(previous)


def test_the_readme_registers_an_algorithm_every_engine_runs(monkeypatch):
    """README's "Adding an algorithm" block, run as written: one registration, and the in-process loop runs it."""
    import re

    import spafl_fl.algorithms as algorithms

    with open(os.path.join(PACKAGE, "..", "..", "README.md")) as f:
        text = f.read()
    block = re.search(r"### Adding an algorithm.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.setattr(algorithms, "ALGORITHMS", dict(algorithms.ALGORITHMS))
    exec(block, {})
    import spafl_fl.config as config_module

    monkeypatch.setattr(config_module, "_REGISTERED", algorithms.ALGORITHMS)
    monkeypatch.setattr("spafl_fl.core.algorithm", algorithms.algorithm)
    sim = Simulation(RunConfig(dataset="digits", model="mlp", clients=3, sample=2, rounds=1, local_epochs=1,
                               measure_baseline=False, algorithm="fedavg-uniform"))
    assert sim.server.weighting == "uniform" and sim.run()["rounds"] == 1
