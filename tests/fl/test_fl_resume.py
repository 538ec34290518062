"""Checkpoints: atomic files, and --resume giving the same metrics as an uninterrupted run."""

import json
import os

import pytest
from helpers_fl import tiny_config

from spafl_fl import Simulation
from spafl_fl.simulation import TIMING_KEYS


def _records(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


@pytest.mark.parametrize(("algorithm", "update"), [("spafl", "lazy"), ("spafl", "eager"), ("fedavg", "lazy"),
                                                  ("local", "lazy")])
def test_resume_matches_uninterrupted(tmp_path, algorithm, update):
    # Lazy SpaFL: each client's last-held global thresholds must survive the checkpoint.
    config = tiny_config(algorithm=algorithm, rounds=3, measure_baseline=False, global_update=update)
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    Simulation(config, whole).run()
    first = Simulation(tiny_config(algorithm=algorithm, rounds=2, measure_baseline=False, global_update=update),
                       split)
    first.run()
    # A crash after a metrics line was written but before its checkpoint: resume drops the line.
    with open(os.path.join(split, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"round": 3, "accuracy": -1}) + "\n")
    resumed = Simulation(config, split, resume=True)
    assert resumed.rounds_done == 2
    resumed.run()
    assert _records(split) == _records(whole)
    with open(os.path.join(whole, "summary.json")) as a, open(os.path.join(split, "summary.json")) as b:
        sa, sb = json.load(a), json.load(b)
    assert {k: v for k, v in sa.items() if "seconds" not in k} == {k: v for k, v in sb.items() if "seconds" not in k}
    assert sorted(f for f in os.listdir(split) if f.startswith("checkpoint")) == [
        "checkpoint-000003.safetensors", "checkpoint.json"]


def test_resume_refuses_other_settings_and_fresh_runs_refuse_old_dirs(tmp_path):
    out = str(tmp_path / "run")
    Simulation(tiny_config(rounds=1, measure_baseline=False), out).run()
    with pytest.raises(ValueError, match="lr=0.05 \\(now 0.1\\)"):
        Simulation(tiny_config(rounds=2, lr=0.1, measure_baseline=False), out, resume=True)
    with pytest.raises(FileExistsError, match="--resume"):
        Simulation(tiny_config(rounds=2, measure_baseline=False), out)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Simulation(tiny_config(), str(tmp_path / "empty"), resume=True)


def test_kill_9_then_resume_gives_the_same_metrics(tmp_path):
    """A real crash: the CLI process is SIGKILLed mid-run (lazy update), then --resume finishes it."""
    import signal
    import subprocess
    import sys
    import time

    from spafl_fl.cli import main

    flags = ["--dataset", "synthetic", "--model", "mlp", "--clients", "4", "--sample", "2", "--rounds", "8",
             "--local-epochs", "2", "--batch-size", "64", "--lr", "0.05", "--alpha", "0.5", "--seed", "3",
             "--no-baseline", "--no-progress", "--threads", "1", "--global-update", "lazy"]
    killed, whole = str(tmp_path / "killed"), str(tmp_path / "whole")
    metrics = os.path.join(killed, "metrics.jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "spafl_fl", "run", *flags, "--out", killed],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        pointer = os.path.join(killed, "checkpoint.json")  # killed once a round is checkpointed
        while time.monotonic() < deadline and not os.path.exists(pointer):
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    with open(metrics) as f:
        done = len(f.readlines())
    assert 1 <= done < 8
    assert main(["run", *flags, "--out", killed, "--resume"]) == 0
    assert main(["run", *flags, "--out", whole]) == 0
    assert _records(killed) == _records(whole)
