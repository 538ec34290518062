"""Same seed, same numbers: the cpp backend's timed path choices are replayed by a rerun (the per-machine
cache) and by --resume (the checkpoint), even when the clock would now choose otherwise."""

import json
import os

import pytest
from helpers_fl import tiny_config

from spafl_fl import Simulation
from spafl_fl.simulation import TIMING_KEYS
from spafl_kernels import _ext, paths

pytestmark = pytest.mark.skipif(not _ext.extension_available(), reason="the cpp backend needs the extension")


def _records(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def _config(rounds):
    # A fresh optimizer each round: the trajectory whose round 3 meets no new call signature (checked below).
    return tiny_config(rounds=rounds, measure_baseline=False, backend="cpp", client_optimizer="fresh")


@pytest.fixture(autouse=True)
def _empty_table(monkeypatch):
    monkeypatch.delenv("SPAFL_CPU_PATH", raising=False)
    paths.clear_table()
    yield
    paths.clear_table()


def test_a_seeded_rerun_replays_the_choices(tmp_path, monkeypatch):
    monkeypatch.setenv("SPAFL_PATH_CACHE", str(tmp_path / "cache.json"))
    monkeypatch.setenv("SPAFL_CPU_TIMED_CHOICE", "first")  # the first run's clock picks skipping everywhere
    Simulation(_config(2), str(tmp_path / "a")).run()
    table = paths.export_table()
    assert table and {e["choice"] for e in table if e["kind"] != "conv2d_dw"} == {"skip"}
    paths.save_cache()  # at exit of the first process
    # The rerun: a new process (empty table, the cache loaded) whose clock would pick masked dense.
    paths.clear_table()
    paths.load_cache()
    monkeypatch.setenv("SPAFL_CPU_TIMED_CHOICE", "second")
    Simulation(_config(2), str(tmp_path / "b")).run()
    assert _records(tmp_path / "a") == _records(tmp_path / "b")
    assert paths.export_table() == table
    with open(tmp_path / "b" / "kernel-paths.json") as f:
        assert json.load(f) == table
    # Without the cache the other outcome is what that clock records (so the replay above was needed).
    paths.clear_table()
    Simulation(_config(1), str(tmp_path / "c")).run()
    assert {e["choice"] for e in paths.export_table()} == {"dense"}


def test_resume_replays_the_checkpointed_choices(tmp_path, monkeypatch):
    monkeypatch.setenv("SPAFL_PATH_CACHE", "off")
    monkeypatch.setenv("SPAFL_CPU_TIMED_CHOICE", "first")
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    Simulation(_config(3), whole).run()
    whole_table = paths.export_table()
    paths.clear_table()
    Simulation(_config(2), split).run()
    # The resumed process: empty table, its clock would pick masked dense; the checkpoint's choices win,
    # also over any a cache had loaded (here: the opposite of every one).
    paths.clear_table()
    with open(os.path.join(split, "kernel-paths.json")) as f:
        saved = json.load(f)
    paths.import_table([dict(e, choice="dense" if e["choice"] == "skip" else e["choice"]) for e in saved])
    monkeypatch.setenv("SPAFL_CPU_TIMED_CHOICE", "second")
    # Round 3 of this tiny run meets no signature rounds 1-2 did not (checked below), so every choice
    # it makes is a replayed one.
    Simulation(_config(3), split, resume=True).run()
    assert saved == whole_table
    assert _records(whole) == _records(split)
