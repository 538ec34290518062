"""The programs in examples/ run as a user runs them and do what their docstrings say."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def run_example(name: str, *args: str, timeout: float = 600) -> str:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_plain_pytorch_round_learns_and_prunes():
    out = run_example("spafl_round.py", "--rounds", "8")
    rounds = re.findall(r"round +(\d+): mean accuracy +([\d.]+) %, weights in active rows ([\d.]+)", out)
    assert [int(r) for r, _, _ in rounds] == list(range(1, 9)), out
    first_accuracy, last_accuracy = float(rounds[0][1]), float(rounds[-1][1])
    assert last_accuracy > max(first_accuracy, 80.0), out
    assert float(rounds[-1][2]) < 0.95, out  # the penalty pruned rows


@pytest.mark.slow
def test_flower_app_runs_on_the_simulation_engine():
    pytest.importorskip("flwr")
    out = run_example("flower_spafl.py")
    rounds = re.findall(r"round (\d): (\d)/2 replies, train accuracy ([\d.]+), density ([\d.]+)", out)
    assert [int(r) for r, _, _, _ in rounds] == [1, 2, 3, 4, 5], out
    assert all(int(n) == 2 for _, n, _, _ in rounds), out
    assert float(rounds[-1][2]) > 0.8 and float(rounds[-1][3]) < 0.9, out


def test_readme_quotes_the_examples_verbatim():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    quotes = re.findall(r"<!-- quoted from (examples/[\w.]+) -->\n```python\n(.*?)```", readme, re.S)
    assert quotes, "README quotes no example"
    for path, block in quotes:
        with open(os.path.join(ROOT, path)) as f:
            assert block in f.read(), f"README's quote of {path} is not in the file"
