"""The app's ``ServerApp`` (``spafl_fl.flower_app.server:app``), for both Flower engines.

Reads the run's settings from ``context.run_config`` (``from_run_config``), runs the algorithm
(``strategy.RunStrategy``, ``strategy.drive``) and writes the files of ``spafl-fl run`` plus a checkpoint per
round into ``out-dir`` on the SuperLink's machine. ``status.json`` there says how the run ended:
``{"status": "finished"}`` or ``{"status": "failed", "error": ...}`` (``spafl-fl deploy-local`` and
``spafl-fl flower`` wait for it).
"""

from __future__ import annotations

import json
import logging
import os

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..checkpoint import atomic_write_text
from . import from_run_config
from .strategy import RunStrategy, drive

log = logging.getLogger("spafl_fl")

STATUS = "status.json"


def out_dir_of(deploy: dict, run_id: int) -> str:
    return os.path.abspath(deploy["out-dir"] or os.path.join("spafl-runs", f"run-{run_id}"))


def make_server_app(defaults: dict | None = None, engine: str = "flower-deployment") -> ServerApp:
    """The ServerApp; ``defaults``: run-config values under the run's own (Flower's simulation engine, started
    from Python, has no run config of its own); ``engine``: written into config.json."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config, deploy = from_run_config({**(defaults or {}), **context.run_config})
        out_dir = out_dir_of(deploy, context.run_id)
        status = os.path.join(out_dir, STATUS)
        strategy = None
        try:
            if config.threads > 0:
                import torch

                torch.set_num_threads(config.threads)
            # Claims out-dir (nothing is written into a folder holding another run), resumes, writes config.json.
            strategy = RunStrategy(config, out_dir, resume=deploy["resume"], overwrite=deploy["overwrite"],
                                   connect_timeout=deploy["connect-timeout"], engine=engine)
            strategy.recorder.open_log()
            log.setLevel(logging.INFO)
            drive(strategy, grid, timeout=deploy["round-timeout"])
        except (FileExistsError, NotADirectoryError):
            raise  # out-dir holds another run, or is a file: leave it alone
        except BaseException as error:
            log.error("the run failed: %s", error)
            if os.path.isdir(out_dir):
                atomic_write_text(status, json.dumps({"status": "failed",
                                                      "error": f"{type(error).__name__}: {error}"}))
            raise
        finally:
            if strategy is not None:
                strategy.recorder.close()
        atomic_write_text(status, json.dumps({"status": "finished", "rounds": strategy.rounds_done}))

    return app


app = make_server_app()
