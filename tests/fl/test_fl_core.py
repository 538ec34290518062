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


def imported_modules(path: str) -> set[str]:
    """The spafl_fl modules a file imports (relative or absolute), by their first name inside the package."""
    with open(path) as f:
        tree = ast.parse(f.read())
    inside = os.path.relpath(path, PACKAGE).count(os.sep)  # how deep the file sits in the package
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = os.path.relpath(path, PACKAGE).split(os.sep)[:-1][:max(inside - node.level + 1, 0)]
                base = [*parts, *(node.module.split(".") if node.module else [])]
                names = [base] if node.module else [[*base, alias.name] for alias in node.names]
            elif node.module and node.module.startswith("spafl_fl."):
                names = [node.module.split(".")[1:]]
            else:
                continue
            found.update(n[0].removesuffix(".py") for n in names if n)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("spafl_fl."))
    return found


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


def test_every_algorithm_is_registered_once_and_runs():
    assert set(ALGORITHMS) == {"spafl", "fedavg", "local"}


REGRESSION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "regression")
NEW_KEYS = {"rejected_evaluations", "uplink_wire_bits", "downlink_wire_bits", "client_compute_seconds",
            "client_cpu_seconds"}


@pytest.mark.parametrize("name", ["spafl-lazy", "spafl-eager", "fedavg-lazy", "local-lazy"])
def test_run_gives_the_numbers_it_gave_before_the_core(name, monkeypatch):
    """metrics.jsonl of ``spafl-fl run --dataset digits --model mlp --clients 3 --sample 2 --rounds 2 --local-epochs 1
    --seed 5 --threads 1 --no-baseline --classifier sparse --algorithm A --global-update U`` as written before the engine-neutral core
    (SPAFL_CPU_PATH=skip): every field but the timings is the same, and the records only gained the keys every
    engine now shares (what Flower carried: null here)."""
    monkeypatch.setenv("SPAFL_CPU_PATH", "skip")
    algorithm, update = name.split("-")
    config = RunConfig(dataset="digits", model="mlp", clients=3, sample=2, rounds=2, local_epochs=1, seed=5,
                       threads=1, measure_baseline=False, algorithm=algorithm, global_update=update,
                       classifier="sparse")
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
