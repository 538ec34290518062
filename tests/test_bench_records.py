"""Benchmark records a reader can trust: every candidate's spread (p20/p50/p80), the package version, the
git commit and whether the tree had uncommitted changes, the time and the machine, in JSON and Markdown."""

from __future__ import annotations

import datetime
import json
import subprocess

import pytest
import torch

import spafl_kernels as sk
from spafl_kernels.bench import cli, records, timing

LAYER = ["--layers", "lenet5-fc2", "--densities", "1", "--reps", "3", "--modes", "fwd", "--ste", "outer",
         "--backends", "torch", "--threads", "1"]


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(sk.__path__[0]), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_spread_is_p20_p50_p80():
    assert timing.spread([5.0, 1.0, 2.0, 4.0, 3.0]) == {"p20": 1.8, "p50": 3.0, "p80": 4.2}
    assert timing.spread([2.0]) == {"p20": 2.0, "p50": 2.0, "p80": 2.0}
    timings = timing.time_interleaved({"a": lambda: None, "b": lambda: None}, reps=5, warmup=0,
                                     min_sample_s=0.0)
    for t in timings.values():
        assert set(t) == {"p20", "p50", "p80"} and t["p20"] <= t["p50"] <= t["p80"]


def test_timing_reads_the_clock_it_is_given():
    """A CPU-time clock (``time.thread_time``) times an oversubscribed machine: every sample comes from it."""
    ticks = iter(range(1000))
    samples = timing.interleaved_samples({"a": lambda: None, "b": lambda: None}, reps=3, warmup=0,
                                         clock=lambda: float(next(ticks)))
    assert samples == {"a": [1.0] * 3, "b": [1.0] * 3}  # one call per sample (a tick lasts past 10 ms)


def test_layer_records_carry_spread_and_provenance(tmp_path, capsys):
    cli.main([*LAYER, "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")])
    record = json.loads((tmp_path / "r.json").read_text())
    meta = record["meta"]
    assert meta["package"] == sk.__version__ and meta["torch"] == torch.__version__ and meta["cpu"]
    assert "gpu" in meta and meta["threads"] == 1
    age = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(meta["timestamp"])
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=30)
    try:
        head = _git("rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    assert meta["git_commit"] == head and isinstance(meta["git_dirty"], bool)
    for row in record["rows"]:
        assert row["p20_seconds"] <= row["seconds"] <= row["p80_seconds"]
        assert row["dense_p20_seconds"] <= row["dense_seconds"] <= row["dense_p80_seconds"]
    markdown = (tmp_path / "r.md").read_text()
    assert f"spafl-kernels {sk.__version__}, commit {head[:12]}" in markdown and "p20-p80 ms" in markdown
    assert "measured " + meta["timestamp"] in markdown


def test_model_records_carry_spread_and_provenance(tmp_path, capsys):
    cli.main(["--models", "mlp", "--densities", "1", "--backends", "torch", "--reps", "3", "--threads", "1",
                "--json", str(tmp_path / "m.json"), "--markdown", str(tmp_path / "m.md")])
    record = json.loads((tmp_path / "m.json").read_text())
    assert record["meta"]["package"] == sk.__version__ and "git_dirty" in record["meta"]
    assert {r["candidate"] for r in record["rows"]} == {"dense", "static", "torch"}
    for row in record["rows"]:  # every candidate, baselines included
        assert row["p20_seconds"] <= row["seconds"] <= row["p80_seconds"]
    assert "p20-p80 ms" in (tmp_path / "m.md").read_text()


def test_dirty_tree_is_recorded(tmp_path):
    """A checkout with an uncommitted change to a tracked file is dirty; changes under benchmarks/results
    (where runs write their records) are not."""
    repo = tmp_path / "repo"
    package = repo / "spafl_kernels"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    package.mkdir()
    (package / "__init__.py").write_text("x = 1\n")
    (repo / "benchmarks" / "results" / "r.json").write_text("{}\n")
    env = ["-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    for args in (["init", "-q"], ["add", "-A"], [*env, "commit", "-qm", "init"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
    clean = records.source_state(str(package))
    assert clean["git_dirty"] is False and len(clean["git_commit"]) == 40
    (repo / "benchmarks" / "results" / "r.json").write_text('{"new": 1}\n')
    assert records.source_state(str(package))["git_dirty"] is False
    (package / "__init__.py").write_text("x = 2\n")
    assert records.source_state(str(package))["git_dirty"] is True
    assert records.source_state(str(tmp_path))["git_commit"] is None  # not a checkout of the package
