"""``spafl-fl flower``: the Flower app (``flower_app``: one ServerApp and one ClientApp for every algorithm)
on Flower's simulation engine (Ray), one virtual SuperNode per client, in this machine.

The run's settings reach both apps as run-config values (``flower_app.app_config``), exactly as
``deploy-local`` writes them into the app's pyproject.toml; the ServerApp writes the files of
``spafl-fl run`` into the run folder and ``status.json``, which this module reads when the engine returns.
The clients keep their state in ``<run folder>/deployment/nodes`` so that ``--resume`` continues the run.
"""

from __future__ import annotations

import json
import os

# Flower and Ray report usage to their servers unless told not to; read when they are imported.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from .checkpoint import read_json_object  # noqa: E402
from .config import RunConfig  # noqa: E402
from .data import load_dataset  # noqa: E402
from .rundir import DEPLOYMENT_FOLDER, claim_out_dir, deployment_output, read_resume  # noqa: E402
from .userspec import cwd_on_path  # noqa: E402

STATUS = "status.json"  # written by the ServerApp (flower_app.server)


def run_flower_simulation(config: RunConfig, out_dir: str, *, resume: bool = False, overwrite: bool = False,
                          num_cpus: int | None = None, client_cpus: float = 1.0, object_store_mb: int = 128) -> dict:
    """Run ``config`` on Flower's simulation engine (Ray) in this machine: ``config.clients`` virtual
    SuperNodes. Ray gets ``num_cpus`` (default: all), a small object store, no dashboard; every client app
    asks for ``client_cpus``. ``out_dir`` must be new or empty unless ``resume`` or ``overwrite``. Returns the
    run's summary; raises ``RuntimeError`` when the run failed, ``ValueError``/``OSError`` before Ray starts
    when the settings, the folder or its checkpoint cannot make the run."""
    from flwr.simulation import run_simulation

    from .flower_app import app_config
    from .flower_app.client import make_client_app
    from .flower_app.server import make_server_app

    out_dir = os.path.abspath(out_dir)
    claim_out_dir(out_dir, resume=resume, overwrite=overwrite, outputs=deployment_output,
                  ignore=(DEPLOYMENT_FOLDER,))
    if resume:  # the run's files, checked as the ServerApp will, before Ray starts
        read_resume(out_dir, config.to_dict())
    load_dataset(config.dataset, config.data_dir, seed=config.seed)  # the data files, before Ray starts
    status = os.path.join(out_dir, STATUS)
    if os.path.isfile(status) and not os.path.islink(status):
        os.remove(status)  # the last attempt's, written by our ServerApp
    values = app_config(config, out_dir=out_dir, resume=resume, overwrite=overwrite,
                        state_dir=os.path.join(out_dir, DEPLOYMENT_FOLDER, "nodes"))
    cwd_on_path()  # Flower hands this sys.path to its Ray workers: a MODULE:CALLABLE from here imports there
    init_args = {"num_cpus": num_cpus or os.cpu_count() or 1, "object_store_memory": object_store_mb * 2**20,
                 "include_dashboard": False, "configure_logging": False}
    backend_config = {"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0}, "init_args": init_args}
    run_simulation(server_app=make_server_app(values, engine="flower"), client_app=make_client_app(values),
                   num_supernodes=config.clients, backend_config=backend_config)
    if not os.path.isfile(status):
        raise RuntimeError("the Flower run stopped before its ServerApp finished (see the log above)")
    with open(status) as f:
        ended = json.load(f)
    if ended.get("status") != "finished":
        raise RuntimeError(f"the Flower run failed: {ended.get('error')} (see {os.path.join(out_dir, 'run.log')})")
    return read_json_object(os.path.join(out_dir, "summary.json"))
