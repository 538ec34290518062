"""SpaFL on Flower's deployment engine: the app shipped with the package (in process, through a fake
Grid), and ``spafl-fl deploy-local`` with a real SuperLink and SuperNodes on loopback."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.common.config import validate_config  # noqa: E402
from helpers_fl import tiny_config  # noqa: E402
from test_fl_flower import FakeGrid, server_identity  # noqa: E402, F401

from spafl_fl import RunConfig  # noqa: E402
from spafl_fl.deploy import DeploymentError, LocalDeployment, alive, deploy_local  # noqa: E402
from spafl_fl.flower_app import (  # noqa: E402
    APP_TEMPLATE,
    DEPLOY_KEYS,
    app_config,
    from_run_config,
    write_app,
)
from spafl_fl.flower_app.client import app as deployed_client_app  # noqa: E402
from spafl_fl.flower_app.messages import to_array_record  # noqa: E402
from spafl_fl.flower_app.mods import WIRE, message_bytes, wire_mod  # noqa: E402
from spafl_fl.flower_app.strategy import RunStrategy as make_strategy  # noqa: E402
from spafl_fl.flower_app.strategy import drive  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIENT_MODULE = "spafl_fl.flower_app.client"

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


def deployed_grid(config: RunConfig, state_dir=None, app=deployed_client_app) -> FakeGrid:
    """A fake Grid whose nodes run the deployment's ClientApp with ``config`` as their run config."""
    grid = FakeGrid(app, config.clients)
    for context in grid.contexts.values():
        context.run_config.update(app_config(config))
        if state_dir is not None:
            context.node_config["state-dir"] = str(state_dir)
    return grid


# -- the app, in process ---------------------------------------------------------------------------

def test_shipped_app_is_a_valid_flower_app_with_every_setting(tmp_path):
    with open(os.path.join(APP_TEMPLATE, "pyproject.toml"), "rb") as f:
        shipped = tomllib.load(f)
    # Every RunConfig field (and nothing else) with its default: a new flag must reach the app too.
    assert shipped["tool"]["flwr"]["app"]["config"] == app_config(), (
        "regenerate the shipped app's settings: python -c \"from spafl_fl.flower_app import *; "
        "text = app_pyproject(app_config()); open(APP_TEMPLATE + '/pyproject.toml', 'w').write(text)\"")
    ok, errors, _ = validate_config(shipped, check_module=True, project_dir=APP_TEMPLATE)
    assert ok, errors
    config = tiny_config(dataset="digits", lr=0.125, data_dir=None)
    folder = write_app(str(tmp_path / "my-app"), app_config(config, out_dir="/runs/x", round_timeout=5.0))
    with open(os.path.join(folder, "pyproject.toml"), "rb") as f:
        run_config = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    back, deploy = from_run_config(run_config)
    assert back == config and deploy == {**DEPLOY_KEYS, "out-dir": "/runs/x", "round-timeout": 5.0}
    # TOML overrides arrive typed as written (`lr=1` is an int): cast to the field types.
    assert from_run_config({"lr": 1, "clients": 4.0, "sample": 2, "measure-baseline": "false"})[0].lr == 1.0
    with pytest.raises(FileExistsError):
        write_app(folder)


def test_the_app_keeps_any_string_setting(tmp_path):
    """The app's settings go through a TOML writer: a folder name with a newline, quotes, a backslash or a control
    character comes back as it was (hand-made TOML wrote a newline raw, which no TOML reader accepts)."""
    odd = 'runs/new\nline "quoted" back\\slash \x01 \u00e9'
    folder = write_app(str(tmp_path / "odd-app"), app_config(tiny_config(), out_dir=odd))
    with open(os.path.join(folder, "pyproject.toml"), "rb") as f:
        shipped = tomllib.load(f)
    assert from_run_config(shipped["tool"]["flwr"]["app"]["config"]) == (tiny_config(), {**DEPLOY_KEYS, "out-dir": odd})
    assert shipped["tool"]["flwr"]["app"]["components"]["serverapp"] == "spafl_fl.flower_app.server:app"


def test_every_install_requirement_is_pinned_for_ci_and_the_fresh_install():
    """setup.py's install_requires (tomli_w among them: the app's TOML writer) are in the Makefile's pinned TOOLS and
    in what dist-check installs into its fresh virtual environment before the wheel (installed with --no-deps)."""
    import ast
    import re

    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.keyword) and n.arg == "install_requires")
    required = {re.split(r"[<>=!~ ]", requirement)[0] for requirement in ast.literal_eval(call.value)}
    assert "tomli_w" in required
    with open(os.path.join(ROOT, "Makefile")) as f:
        makefile = f.read()
    variables = dict(re.findall(r"^(\w+) \S?= (.*)$", makefile, re.M))

    def expand(text: str) -> str:
        return re.sub(r"\$\((\w+)\)", lambda m: expand(variables.get(m.group(1), "")), text)

    tools = expand(re.search(r"^TOOLS := ((?:.*\\\n)*.*)$", makefile, re.M).group(1))
    fresh = expand(re.search(r"^\t\$\(DIST\)/venv/bin/pip install .* torch==.*$", makefile, re.M).group(0))
    for name in required - {"torch"}:
        assert re.search(rf"\b{name}==", tools), f"{name} is not pinned in TOOLS"
        assert re.search(rf"\b{name}==", fresh), f"dist-check's fresh venv does not install {name}"


def test_wire_mod_measures_messages_and_compute(server_identity):  # noqa: F811
    def handler(message, context):
        time.sleep(0.01)
        return Message(RecordDict({"t": to_array_record({"a": torch.zeros(100)})}), reply_to=message)

    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    message = Message(RecordDict({"c": ConfigRecord({"round": 1})}), dst_node_id=5, message_type="train")
    reply = wire_mod(message, context, handler)
    wire = reply.content.metric_records[WIRE]
    assert wire["in-bytes"] == message_bytes(message) == 8 + len("round")  # Flower counts a number as 8 bytes
    assert wire["out-bytes"] == 4 * 100 + len("a")  # the raw float32 buffer and its key
    assert wire["compute-seconds"] >= 0.01
    # Flower's own count raises on an empty string or list: a client's empty failure reason must not stop a round
    odd = ConfigRecord({"reason": "", "none": [], "text": "abc", "n": 2})
    assert message_bytes(Message(RecordDict({"c": odd}), dst_node_id=5, message_type="train")) == (
        len("reason") + len("none") + len("text") + 3 + len("n") + 8)


def test_wire_mod_uses_only_public_flower_apis():
    """The mod imports only Flower's public packages (a private helper moves between releases)."""
    import ast

    import spafl_fl.flower_app.mods as mods

    with open(mods.__file__) as f:
        tree = ast.parse(f.read())
    used = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    used |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert {m for m in used if m.split(".")[0] == "flwr"} <= {"flwr.app", "flwr.clientapp", "flwr.serverapp"}


def test_deployed_app_rejects_a_tampered_update(tmp_path, server_identity):  # noqa: F811
    config = tiny_config(rounds=1, measure_baseline=False)
    victim = min(make_strategy(config).server.sample_clients(0))

    def tampering(message, context):
        reply = deployed_client_app(message, context)
        if message.metadata.message_type == "train" and context.node_config["partition-id"] == victim:
            record = reply.content["update"]
            name = next(iter(record))
            record[name] = to_array_record({name: torch.full(record[name].shape, float("nan"))})[name]
        return reply

    strategy = make_strategy(config)
    drive(strategy, deployed_grid(config, app=tampering), timeout=30)
    rejected = strategy.records[0]["rejected"]
    assert [r["client"] for r in rejected] == [victim] and "finite" in rejected[0]["reason"]


# -- real processes on loopback --------------------------------------------------------------------

def test_stop_ends_the_whole_process_tree_also_in_other_sessions(tmp_path):
    """Flower starts its SuperExec, ServerApp and ClientApp processes below the SuperLink and SuperNodes,
    some in sessions of their own: ``stop`` finds them through /proc and ends them all."""
    deployment = LocalDeployment(str(tmp_path), 1, say=lambda line: None)
    os.makedirs(deployment.logs)
    script = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
              "start_new_session=True); time.sleep(120)")
    deployment._spawn("parent", [sys.executable, "-c", script])
    deadline = time.monotonic() + 30
    while len(deployment.pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(deployment.pids()) == 2
    deployment.stop(grace=2.0)
    assert len(deployment.seen) == 2 and not any(alive(pid) for pid in deployment.seen)
    deployment.stop()  # twice is fine


def test_deploy_local_usage_errors(tmp_path, capsys):
    from spafl_fl.cli import main

    with pytest.raises(SystemExit) as error:
        main(["deploy-local", "--supernodes", "3", "--clients", "4", "--out", str(tmp_path / "a")])
    assert error.value.code == 2 and "one SuperNode per client" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit) as error:
        main(["deploy-local", "--supernodes", "2", "--sample", "1", "--out", str(tmp_path / "b")])
    assert error.value.code == 2 and "is not empty" in capsys.readouterr().err
    assert not (tmp_path / "b" / "deployment").exists()  # nothing started, nothing written


# digits + MLP, 3 clients (2 a round), 2 rounds: pruning visibly starts (density < 1) in round 2.
RUN_CONFIG = dict(dataset="digits", model="mlp", clients=3, sample=2, rounds=2, local_epochs=2, batch_size=64, lr=0.2,
                  th_coeff=0.05, seed=3, threads=1, measure_baseline=False)
RUN_FLAGS = [f"--{key.replace('_', '-')}={value}" for key, value in RUN_CONFIG.items()
             if key not in ("clients", "measure_baseline")] + ["--no-baseline"]


def _env() -> dict:
    env = dict(os.environ)
    # This checkout's code wins (the ServerApp and ClientApp processes inherit it too).
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "python"), env.get("PYTHONPATH", "")])
    return env


def _leftovers(record: dict, marker: str) -> list[int]:
    """Processes of the deployment still running: its recorded pids, and anything whose command line
    names its SuperLink port or its folder."""
    running = [pid for pid in record["pids"] if alive(pid)]
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmdline = f.read().decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline and alive(int(name)):
                running.append(int(name))
    return running


@pytest.mark.slow
def test_deploy_local_matches_spafl_fl_run(tmp_path):
    """`spafl-fl deploy-local --supernodes 3`: real SuperLink, SuperNodes and `flwr run`; the numbers of
    `spafl-fl run` with the same flags, thresholds only up, and no process left."""
    out = tmp_path / "deployed"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "spafl_fl", "deploy-local", "--supernodes", "3", *RUN_FLAGS,
                           "--round-timeout", "120", "--connect-timeout", "120", "--timeout", "240",
                           "--out", str(out)], env=_env(), capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    print(f"deploy-local, 3 SuperNodes, 2 rounds: {seconds:.1f} s")
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "deployment.json") as f:
        record = json.load(f)
    assert record["flower_status"] == "finished:completed"
    assert not _leftovers(record, str(out)), "processes of the deployment still run"
    assert record["flower_network_traffic"]["inbound-bytes"] > 0
    assert record["uplink_wire_bits"] > 0 and record["client_compute_seconds"] > 0
    assert "Flower carried" in done.stdout

    reference = tmp_path / "in-process"
    subprocess.run([sys.executable, "-m", "spafl_fl", "run", "--clients", "3", *RUN_FLAGS, "--no-progress",
                    "--out", str(reference)], env=_env(), check=True, capture_output=True, timeout=120)
    records = {}
    for folder in (out, reference):
        with open(folder / "metrics.jsonl") as f:
            records[folder] = [json.loads(line) for line in f]
        for name in ("config.json", "summary.json", "accuracy.png", "bits.png"):
            assert (folder / name).is_file(), (folder, name)
    with open(reference / "config.json") as f:
        thresholds = json.load(f)["thresholds"]
    for got, want in zip(records[out], records[reference], strict=True):
        assert got["sampled"] == want["sampled"]
        # One torch thread everywhere: the very same sums, so the very same numbers.
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)
        assert got["density"] == pytest.approx(want["density"], abs=1e-9)
        assert got["uplink_bits"] == want["uplink_bits"] == 8 * 4 * thresholds * len(got["sampled"])
        assert set(got) == set(want)
        assert got["rejected"] == []
    assert records[out][-1]["density"]["total"] < 1.0


def _deploy(out, *flags: str) -> subprocess.CompletedProcess:
    """``spafl-fl deploy-local --supernodes 3`` with RUN_FLAGS and ``flags`` (the last of a flag wins) into ``out``."""
    return subprocess.run([sys.executable, "-m", "spafl_fl", "deploy-local", "--supernodes", "3", *RUN_FLAGS,
                           "--round-timeout", "120", "--connect-timeout", "120", "--timeout", "240", *flags,
                           "--out", str(out)], env=_env(), capture_output=True, text=True, timeout=300)


def _finished_deployment(done: subprocess.CompletedProcess, out) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "deployment.json") as f:
        record = json.load(f)
    assert record["flower_status"] == "finished:completed"
    assert not _leftovers(record, str(out)), "processes of the deployment still run"


def _same_run(deployed, *flags: str) -> None:
    """The deployed run's metrics.jsonl and summary.json are those of ``spafl-fl run`` with the same flags: the same
    clients, bits and record keys, accuracy and train loss within 1e-6 (one torch thread everywhere)."""
    reference = deployed.parent / "in-process"
    subprocess.run([sys.executable, "-m", "spafl_fl", "run", "--clients", "3", *RUN_FLAGS, *flags, "--no-progress",
                    "--out", str(reference)], env=_env(), check=True, capture_output=True, timeout=240)
    records, summaries = {}, {}
    for folder in (deployed, reference):
        with open(folder / "metrics.jsonl") as f:
            records[folder] = [json.loads(line) for line in f]
        with open(folder / "summary.json") as f:
            summaries[folder] = json.load(f)
    for got, want in zip(records[deployed], records[reference], strict=True):
        assert set(got) == set(want)
        assert got["round"] == want["round"] and got["sampled"] == want["sampled"] and got["rejected"] == []
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)
        assert (got["train_loss"] is None) == (want["train_loss"] is None)
        if want["train_loss"] is not None:
            assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-6)
        assert got["density"] == pytest.approx(want["density"], abs=1e-9)
        for key in ("uplink_bits", "downlink_bits", "dense_uplink_bits", "train_flops", "dense_train_flops"):
            assert got[key] == want[key], key
    got, want = summaries[deployed], summaries[reference]
    assert list(got) == list(want) and got["rounds"] == want["rounds"]
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)
    for key in ("weight_density", "mean_row_density", "authors_train_flops", "authors_flops_per_client"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "local"])
def test_deploy_local_runs_fedavg_and_local_like_spafl_fl_run(tmp_path, algorithm):
    """FedAvg (full state both ways) and Local (nothing sent) on real processes give `spafl-fl run`'s numbers, and
    the command reads its own run back (FedAvg's summary lacked its densities and ended in a traceback)."""
    out = tmp_path / "deployed"
    start = time.perf_counter()
    done = _deploy(out, f"--algorithm={algorithm}")
    print(f"deploy-local {algorithm}, 3 SuperNodes, 2 rounds: {time.perf_counter() - start:.1f} s")
    _finished_deployment(done, out)
    assert f"{algorithm} on digits with mlp" in done.stdout
    _same_run(out, f"--algorithm={algorithm}")


@pytest.mark.slow
def test_deploy_local_resumes_like_an_uninterrupted_run(tmp_path):
    """Stopped after round 1, resumed to round 2 (the SuperNodes reload their clients from the node state): the
    numbers of an uninterrupted `spafl-fl run`."""
    out = tmp_path / "deployed"
    _finished_deployment(_deploy(out, "--rounds=1"), out)
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(line)["round"] for line in f] == [1]
    _finished_deployment(_deploy(out, "--resume"), out)
    _same_run(out)


def _node_pid(marker: str, partition: int) -> int | None:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            if any(a.endswith("flower-supernode") for a in argv[:2]) and any(
                    f"partition-id={partition} " in a and marker in a for a in argv):
                return int(name)
    return None


TAMPER = '''
import sys
if sys.argv and sys.argv[0].endswith("flwr-clientapp"):
    import torch
    from spafl_fl.flower_app.messages import to_array_record
    import {module} as deployed

    honest = deployed.app._registered_funcs["train.default"]

    def tampered(message, context):  # well-formed (raw float32, right shape), but NaN
        reply = honest(message, context)
        record = reply.content["update"]
        name = next(iter(record))
        record[name] = to_array_record({{name: torch.full(record[name].shape, float("nan"))}})[name]
        return reply

    deployed.app._registered_funcs["train.default"] = tampered
'''


@pytest.mark.slow
def test_deploy_local_survives_a_tampered_update_and_fails_clearly_on_a_lost_node(tmp_path, monkeypatch):
    """SuperNode 0 sends NaN thresholds (rejected, the round completes); SuperNode 2 is killed after
    round 1: the next broadcast cannot reach it, and the run stops with a message naming it, in bounded
    time, leaving no process behind."""
    hook = tmp_path / "tamper"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(TAMPER.format(module=CLIENT_MODULE))
    for name, value in _env().items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "deployed"
    config = RunConfig(**RUN_CONFIG)
    victim_env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ["PYTHONPATH"]])}

    def kill_node_after_round_one():
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 1:
                pid = _node_pid(str(out), 2)
                if pid is not None:
                    os.killpg(os.getpgid(pid), 9)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_node_after_round_one, daemon=True)
    killer.start()
    start = time.perf_counter()
    with pytest.raises(DeploymentError, match=r"clients \[2\] did not"):
        deploy_local(config, str(out), 3, round_timeout=45.0, connect_timeout=120.0, timeout=240.0,
                     node_env={0: victim_env}, say=lambda line: None)
    print(f"deploy-local with a lost node: failed after {time.perf_counter() - start:.1f} s")
    killer.join(timeout=5)
    with open(out / "deployment.json") as f:
        record = json.load(f)
    assert record["status"]["status"] == "failed"
    assert not _leftovers(record, str(out)), "processes of the deployment still run"
    with open(out / "metrics.jsonl") as f:
        first = json.loads(f.readline())
    assert [r["client"] for r in first["rejected"]] == [0] and "finite" in first["rejected"][0]["reason"]
