"""``spafl-fl deploy-local``: a run on Flower's deployment engine, every part a real process on loopback.

One ``flower-superlink --insecure`` and N ``flower-supernode --insecure`` (node config
``partition-id=k num-partitions=N state-dir=...``), on free ports, with a private ``FLWR_HOME``; the
app (``spafl_fl.flower_app``, settings from the ``spafl-fl run`` flags) is submitted with ``flwr run``,
as a user would across machines. The ServerApp writes the files of ``spafl-fl run`` into ``--out``;
this module waits for its ``status.json``, then records what Flower itself counted for the run
(``flwr ls``: bytes in and out of the SuperLink, ServerApp and ClientApp seconds) in
``deployment.json`` and stops every process it started.

Stopping: the SuperLink and each SuperNode start in their own session; Flower starts its SuperExec,
ServerApp and ClientApp processes below them, some in sessions of their own. ``stop`` collects the whole
process tree (``/proc``) and its process groups, sends SIGTERM, then SIGKILL to what is left after a
grace period. It runs on success, on error, on Ctrl-C and SIGTERM (the CLI turns SIGTERM into
KeyboardInterrupt) and at interpreter exit.

Layout of ``--out``: the run's files (config.json, metrics.jsonl, summary.json, plots, checkpoint,
status.json, run.log, deployment.json) and ``deployment/``: ``spafl-app/`` (the app submitted),
``flwr-home/`` (FLWR_HOME: the connection ``local``), ``logs/`` (one log per process),
``nodes/client-k/`` (the clients' state, for ``--resume``).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable

import tomli_w

from .checkpoint import atomic_write_text, open_append
from .config import RunConfig
from .core import WIRE_KEYS
from .data import load_dataset
from .rundir import DEPLOYMENT_FOLDER, claim_out_dir, clear_outputs, deployment_output, read_metrics, read_resume
from .userspec import importable_env

CONNECTION = "local"
STATUS = "status.json"  # written by the ServerApp (flower_app.server)


class DeploymentError(RuntimeError):
    """The deployment could not start, or the run failed or timed out; the message says which and where
    the logs are."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (Linux ``/proc``; empty elsewhere)."""
    parents = {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parents[int(name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    return parents


def process_tree(roots: list[int]) -> set[int]:
    """``roots`` and all their descendants that are running now."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return {pid for pid in found if alive(pid)}


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _tool(name: str) -> str:
    """A Flower executable: next to this Python (its environment's bin/) first, then on PATH."""
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if found is None:
        raise DeploymentError(f"{name} not found: install Flower, pip install --no-build-isolation '.[flower]'")
    return found


class LocalDeployment:
    """A SuperLink and ``supernodes`` SuperNodes on loopback, as processes, with their files in
    ``folder``. ``node_env``: extra environment variables per partition id (tests use it to run a
    misbehaving node). A context manager: leaving it stops every process it started."""

    def __init__(self, folder: str, supernodes: int, *, node_env: dict[int, dict[str, str]] | None = None,
                 say: Callable[[str], None] = print):
        if supernodes < 1:
            raise ValueError(f"need at least one SuperNode, got {supernodes}")
        self.folder = os.path.abspath(folder)
        self.supernodes = supernodes
        self.node_env = node_env or {}
        self.say = say
        self.home = os.path.join(self.folder, "flwr-home")
        self.logs = os.path.join(self.folder, "logs")
        self.state_dir = os.path.join(self.folder, "nodes")
        self.processes: dict[str, subprocess.Popen] = {}
        self.port: int | None = None
        self.seen: set[int] = set()  # every pid of the deployment seen so far
        self._log_files = []
        self._reported: set[str] = set()
        atexit.register(self.stop)

    # -- processes ---------------------------------------------------------------------------------

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = importable_env()  # a --model/--dataset MODULE:CALLABLE from the current directory imports there too
        # Flower's processes start more of Flower's executables by name (flower-superexec, ...): put this
        # Python's bin/ first on PATH, so they are found when the environment is not activated (make test).
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        env.update({"FLWR_HOME": self.home, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"})
        env.update(extra or {})
        return env

    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open_append(os.path.join(self.logs, f"{name}.log"), binary=True)
        self._log_files.append(log)
        # A session of its own: Ctrl-C in the terminal reaches this process only, which then stops
        # the deployment in order; and the group can be signalled as one.
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=self.env(extra_env), cwd=self.folder, start_new_session=True)
        self.processes[name] = process
        self.seen.add(process.pid)
        return process

    def start(self, timeout: float = 60.0) -> None:
        """Start the SuperLink, wait until it answers, start the SuperNodes; write the connection
        ``local`` into ``FLWR_HOME/config.toml``."""
        for path in (self.home, self.logs, self.state_dir):
            os.makedirs(path, exist_ok=True)
        ports = free_ports(1 + self.supernodes)
        self.port = ports[0]
        connection = {"address": f"127.0.0.1:{self.port}", "insecure": True}
        atomic_write_text(os.path.join(self.home, "config.toml"),
                          tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}))
        # Runtime dependency installation would `uv sync` the app's dependencies: a second torch.
        self._spawn("superlink", [_tool("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                  "--port", str(self.port), "--disable-runtime-dependency-installation"])
        self._wait_ready(timeout)
        for k in range(self.supernodes):
            node_config = f'partition-id={k} num-partitions={self.supernodes} state-dir="{self.state_dir}"'
            self._spawn(f"supernode-{k}", [_tool("flower-supernode"), "--insecure", "--superlink",
                                           f"127.0.0.1:{self.port}", "--port", str(ports[1 + k]),
                                           "--node-config", node_config], self.node_env.get(k))
        self.say(f"SuperLink on 127.0.0.1:{self.port}, {self.supernodes} SuperNodes (logs in {self.logs})")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise DeploymentError(f"the SuperLink did not answer on 127.0.0.1:{self.port} within {timeout:.0f} s "
                              f"(see {self.logs}/superlink.log)")

    def check_alive(self) -> None:
        """Raise if the SuperLink has exited. A SuperNode that exits is reported once: the run decides
        (its round timeout turns the node's silence into a failed client, as across machines)."""
        for name, process in self.processes.items():
            if process.poll() is None:
                continue
            if name == "superlink":
                raise DeploymentError(f"{name} exited with code {process.returncode} (see {self.logs}/{name}.log)")
            if name not in self._reported:
                self._reported.add(name)
                self.say(f"{name} exited with code {process.returncode} (see {self.logs}/{name}.log)")

    def pids(self) -> set[int]:
        """Every running process of the deployment: those started here and their descendants (Flower's
        SuperExec, ServerApp and ClientApp processes)."""
        self.seen |= process_tree([p.pid for p in self.processes.values()])
        return {pid for pid in self.seen if alive(pid)}

    def stop(self, grace: float = 5.0) -> None:
        """Stop every process of the deployment: SIGTERM to each process and process group, SIGKILL to
        what still runs after ``grace`` seconds. Safe to call more than once."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                for kill in (os.killpg, os.kill):
                    try:
                        kill(os.getpgid(pid) if kill is os.killpg else pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self.pids():
                for process in self.processes.values():
                    process.poll()  # reap the direct children
                time.sleep(0.1)
        for process in self.processes.values():
            try:
                process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        for log in self._log_files:
            log.close()
        self._log_files = []

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- flwr CLI ----------------------------------------------------------------------------------

    def flwr(self, *args: str, timeout: float = 120.0) -> dict:
        """Run ``flwr ARGS --format json`` against this deployment; its JSON answer."""
        try:
            done = subprocess.run([_tool("flwr"), *args, "--format", "json"], capture_output=True, text=True,
                                  env=self.env(), cwd=self.folder, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as error:
            raise DeploymentError(f"flwr {' '.join(args)} did not answer within {timeout:.0f} s") from error
        start = done.stdout.find("{")
        try:
            answer = json.loads(done.stdout[start:]) if start >= 0 else None
        except json.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict) or not answer.get("success", False):
            reason = answer.get("error-message") if isinstance(answer, dict) else (done.stdout + done.stderr)
            raise DeploymentError(f"flwr {' '.join(args)} failed: {str(reason).strip()}")
        return answer

    def submit(self, app_dir: str) -> int:
        """``flwr run APP_DIR local``; the run id."""
        answer = self.flwr("run", app_dir, CONNECTION)
        return int(answer["run-id"])

    def run_info(self, run_id: int) -> dict:
        """``flwr ls --run-id`` of the run: status, network traffic, compute time."""
        runs = self.flwr("ls", "--run-id", str(run_id)).get("runs", [])
        return runs[0] if runs else {}


def wait_for_run(deployment: LocalDeployment, run_id: int, out_dir: str, timeout: float,
                 poll_flwr: float = 30.0) -> dict:
    """Wait until the ServerApp writes ``status.json`` in ``out_dir``; return it. Raise ``DeploymentError``
    when a process of the deployment exits, when Flower reports the run finished without it (the
    ServerApp crashed before writing it), or after ``timeout`` seconds."""
    path = os.path.join(out_dir, STATUS)
    deadline = time.monotonic() + timeout
    next_poll = time.monotonic() + poll_flwr
    finished_at = None
    while True:
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        deployment.check_alive()
        now = time.monotonic()
        if now > deadline:
            raise DeploymentError(f"the run did not finish within {timeout:.0f} s (raise --timeout; logs in "
                                  f"{deployment.logs}, `flwr log {run_id}` while it runs)")
        if now >= next_poll:
            next_poll = now + poll_flwr
            status = str(deployment.run_info(run_id).get("status", ""))
            if status.startswith("finished"):
                finished_at = finished_at or now
                if now - finished_at > 5.0:
                    raise DeploymentError(f"Flower reports the run {status} and the ServerApp wrote no "
                                          f"{STATUS} (see {deployment.logs}/superlink.log)")
        time.sleep(0.5)


def wire_totals(out_dir: str) -> dict:
    """The run's totals of what Flower carried and of the clients' handler time (``metrics.jsonl``)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    try:
        records = read_metrics(path)
    except ValueError:  # a damaged log is reported by whatever reads the run; here it has no totals
        return {}
    return {key: sum(rec.get(key, 0) for rec in records) for key in WIRE_KEYS}


def deploy_local(config: RunConfig, out_dir: str, supernodes: int, *, resume: bool = False, overwrite: bool = False,
                 round_timeout: float = 600.0, connect_timeout: float = 300.0, timeout: float = 3600.0,
                 node_env: dict[int, dict[str, str]] | None = None,
                 say: Callable[[str], None] = print) -> dict:
    """Run ``config`` on a local deployment of ``supernodes`` SuperNodes (one per client); the run's
    files go to ``out_dir``, which must be new or empty unless ``resume`` (continue the run there) or
    ``overwrite`` (replace what a previous run wrote; other files are kept). Returns
    ``deployment.json``'s content: the ServerApp's status and what Flower counted. Raises
    ``DeploymentError`` when the run fails (its message says why), ``ValueError``/``OSError`` before
    any process starts when the settings, the folder or its checkpoint cannot make the run."""
    from .flower_app import app_config, write_app

    if supernodes != config.clients:
        raise ValueError(f"one SuperNode per client: {supernodes} SuperNodes for {config.clients} clients")
    out_dir = os.path.abspath(out_dir)
    claim_out_dir(out_dir, resume=resume, overwrite=overwrite, outputs=deployment_output,
                  ignore=(DEPLOYMENT_FOLDER,), what="what a previous run wrote")
    if resume:  # the run's files, checked as the ServerApp will, before any process starts
        read_resume(out_dir, config.to_dict())
    # The data files, before any process starts (a missing --data-dir is a usage error, not a failed run).
    load_dataset(config.dataset, config.data_dir, seed=config.seed)
    if overwrite:
        clear_outputs(out_dir, deployment_output)
    folder = os.path.join(out_dir, DEPLOYMENT_FOLDER)
    app_dir = os.path.join(folder, "spafl-app")
    os.makedirs(folder, exist_ok=True)
    if os.path.isfile(os.path.join(out_dir, STATUS)) and not os.path.islink(os.path.join(out_dir, STATUS)):
        os.remove(os.path.join(out_dir, STATUS))  # the last attempt's, written by our ServerApp
    write_app(app_dir, app_config(config, out_dir=out_dir, resume=resume, overwrite=overwrite,
                                  round_timeout=round_timeout, connect_timeout=connect_timeout), overwrite=True)
    started = time.perf_counter()
    record: dict = {"supernodes": supernodes}
    deployment = LocalDeployment(folder, supernodes, node_env=node_env, say=say)
    try:
        deployment.start()
        record["superlink_port"] = deployment.port
        run_id = record["run_id"] = deployment.submit(app_dir)
        say(f"submitted run {run_id}; waiting for {config.rounds} rounds")
        status = record["status"] = wait_for_run(deployment, run_id, out_dir, timeout)
        # The ServerApp writes status.json just before it returns: give Flower a moment to book the run
        # as finished, so that its counts below are final (every ~2 s, at most 60 s).
        info = deployment.run_info(run_id)
        settle = time.monotonic() + 60
        while not str(info.get("status", "")).startswith("finished") and time.monotonic() < settle:
            time.sleep(2)
            info = deployment.run_info(run_id)
        # What the SuperLink counted for the run (every message in and out, framing included).
        record.update({"flower_status": info.get("status"), "flower_network_traffic": info.get("network-traffic"),
                       "flower_compute_time": info.get("compute-time")})
    except BaseException as error:
        record["error"] = f"{type(error).__name__}: {error}"
        raise
    finally:
        deployment.stop()
        record.update(wire_totals(out_dir))
        record["wall_seconds"] = time.perf_counter() - started
        record["pids"] = sorted(deployment.seen)  # all stopped by now
        atomic_write_text(os.path.join(out_dir, "deployment.json"), json.dumps(record, indent=1))
    if status.get("status") != "finished":
        raise DeploymentError(f"the run failed: {status.get('error')} (logs in {folder}/logs and {out_dir}/run.log)")
    return record
