"""The deployment's ``ServerApp`` (``spafl_fl.flower_app.server:app``).

Reads the run's settings from ``context.run_config`` (``from_run_config``), runs SpaFL or FedAvg
(``strategy.make_strategy``, ``strategy.drive``) and writes the files of ``spafl-fl run`` plus a
checkpoint per round into ``out-dir`` on the SuperLink's machine. ``status.json`` there says how the run
ended: ``{"status": "finished"}`` or ``{"status": "failed", "error": ...}`` (``spafl-fl deploy-local``
waits for it).
"""

from __future__ import annotations

import json
import logging
import os

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..checkpoint import atomic_write_text
from ..rundir import close_log, log_handler
from . import from_run_config
from .strategy import drive, make_strategy

log = logging.getLogger("spafl_fl")

STATUS = "status.json"


def out_dir_of(deploy: dict, run_id: int) -> str:
    return os.path.abspath(deploy["out-dir"] or os.path.join("spafl-runs", f"run-{run_id}"))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config, deploy = from_run_config(context.run_config)
    out_dir = out_dir_of(deploy, context.run_id)
    status = os.path.join(out_dir, STATUS)
    handler = None
    try:
        if config.threads > 0:
            import torch

            torch.set_num_threads(config.threads)
        # Claims out-dir (nothing is written into a folder holding another run), resumes, writes config.json.
        strategy = make_strategy(config, out_dir, resume=deploy["resume"], overwrite=deploy["overwrite"],
                                 connect_timeout=deploy["connect-timeout"])
        handler = log_handler(os.path.join(out_dir, "run.log"))
        log.setLevel(logging.INFO)
        drive(strategy, grid, timeout=deploy["round-timeout"])
    except (FileExistsError, NotADirectoryError):
        raise  # out-dir holds another run, or is a file: leave it alone
    except BaseException as error:
        log.error("the run failed: %s", error)
        if os.path.isdir(out_dir):
            atomic_write_text(status, json.dumps({"status": "failed", "error": f"{type(error).__name__}: {error}"}))
        raise
    finally:
        if handler is not None:
            close_log(handler)
    atomic_write_text(status, json.dumps({"status": "finished", "rounds": strategy.rounds_done}))
