"""The Flower app: one ServerApp and one ClientApp for every algorithm, on Flower's simulation engine and on
its deployment engine (``flwr run``: a SuperLink, one SuperNode per device).

- ``spafl-app/`` (shipped with the package; ``spafl-fl flower-app DIR`` copies it out) is the app:
  a ``pyproject.toml`` whose ``[tool.flwr.app.components]`` name the module-level apps below and
  whose ``[tool.flwr.app.config]`` holds every ``spafl-fl run`` setting (``RUN_KEYS``: the
  ``RunConfig`` fields with hyphens) plus where the ServerApp writes and how long it waits
  (``DEPLOY_KEYS``). ``flwr run --run-config 'rounds=50 lr=0.01'`` overrides any of them.
- ``spafl_fl.flower_app.server:app``: the ``ServerApp``; runs every registered algorithm (``RunStrategy``)
  from ``context.run_config``, writes the files of ``spafl-fl run`` into ``out-dir`` on the SuperLink's
  machine, checkpoints every round and resumes (``resume = true``).
- ``spafl_fl.flower_app.client:app``: the ``ClientApp``; node config ``partition-id`` picks the
  client (its data partition). With node config ``state-dir``, a client keeps its state on the node's
  disk, so that a resumed run continues from it.

The same two apps run on Flower's simulation engine (``spafl-fl flower``: ``make_server_app`` and
``make_client_app`` with the run's settings, through ``flwr.simulation.run_simulation``) and on its
deployment engine (``spafl-fl deploy-local``, ``flwr run``).
- ``spafl_fl.flower_app.mods.wire_mod``: message sizes and client compute time, for any ClientApp.

The app bundle (FAB) Flower sends carries only text files, not this package and its compiled
kernels: every SuperNode (and the SuperLink's machine) needs ``spafl-kernels[fl,flower]`` installed,
and the SuperLink runs with ``--disable-runtime-dependency-installation``.
"""

from __future__ import annotations

import os
from dataclasses import fields

import tomli_w

from ..checkpoint import atomic_write_bytes, atomic_write_text
from ..config import RunConfig, default_classifier
from ..rundir import claim_out_dir

APP_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spafl-app")
"""The app folder shipped with the package (``pyproject.toml``, README.md)."""

RUN_KEYS = {f.name.replace("_", "-"): f.name for f in fields(RunConfig)}
"""run-config key -> ``RunConfig`` field."""

DEPLOY_KEYS = {"out-dir": "", "resume": False, "overwrite": False, "round-timeout": 600.0, "connect-timeout": 300.0,
               "state-dir": ""}
"""run-config keys of the deployment and their defaults: the ServerApp's output folder on the
SuperLink's machine ("": ``spafl-runs/run-<run id>`` under its working directory; it must be new or
empty), continue the run found there, replace the files a previous run wrote there (other files are
kept), seconds a round waits for replies (a node that does not answer in time counts as
failed), seconds the run waits for all its SuperNodes to connect, and where the clients keep their state
when the node config names no ``state-dir`` ("": in memory only)."""


_OPTIONAL = ("data-dir", "preset", "classifier")
"""Run-config keys whose ``RunConfig`` value may be None, written as "" (TOML has no null); a classifier that is
its model's default is written as "" too, so that an app whose ``model`` is changed gets that model's default."""


def to_run_config(config: RunConfig, **deploy) -> dict:
    """``config`` (and ``DEPLOY_KEYS`` values, by field name with underscores) as run-config values
    (TOML has no null: ``data_dir=None`` is "")."""
    values = {key: getattr(config, name) for key, name in RUN_KEYS.items()}
    if config.classifier == default_classifier(config.model):
        values["classifier"] = None
    for key in _OPTIONAL:
        values[key] = values[key] or ""
    for name, value in deploy.items():
        key = name.replace("_", "-")
        if key not in DEPLOY_KEYS:
            raise ValueError(f"unknown deployment setting {name!r}; known: {sorted(DEPLOY_KEYS)}")
        values[key] = value
    return values


def from_run_config(run_config) -> tuple[RunConfig, dict]:
    """The ``RunConfig`` and the deployment settings (``DEPLOY_KEYS``, defaults filled) of a Flower
    ``context.run_config``. Values are cast to the field types (a TOML ``lr=1`` arrives as an int)."""
    defaults = RunConfig()
    values = {}
    for key, name in RUN_KEYS.items():
        if key not in run_config:
            continue
        default, value = getattr(defaults, name), run_config[key]
        if key in _OPTIONAL:
            value = str(value) or None
        elif isinstance(default, bool):
            value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        elif default is not None:
            value = type(default)(value)
        values[name] = value
    deploy = {key: type(default)(run_config.get(key, default)) for key, default in DEPLOY_KEYS.items()}
    return RunConfig(**values), deploy


CONFIG_HEADER = "[tool.flwr.app.config]\n"


def app_config(config: RunConfig | None = None, **deploy) -> dict:
    """Every run-config value of the app: ``config``'s (default ``RunConfig()``), then ``DEPLOY_KEYS``
    with ``deploy`` overriding their defaults."""
    return {**to_run_config(config or RunConfig()), **DEPLOY_KEYS, **to_run_config(config or RunConfig(), **deploy)}


def app_pyproject(values: dict) -> str:
    """The app's pyproject.toml (``APP_TEMPLATE``'s) with ``values`` as its ``[tool.flwr.app.config]``."""
    with open(os.path.join(APP_TEMPLATE, "pyproject.toml")) as f:
        template = f.read()
    head = template[:template.index(CONFIG_HEADER)]  # the comments and the app's own tables, kept as written
    return head + tomli_w.dumps({"tool": {"flwr": {"app": {"config": values}}}})


def write_app(folder: str, values: dict | None = None, overwrite: bool = False) -> str:
    """Write the app into ``folder``: ``APP_TEMPLATE``'s files, its config set to ``values`` (default
    ``app_config()``). ``folder`` must be new or empty unless ``overwrite`` (then only the app's files are
    replaced; a symbolic link among them is refused). Flower names an app after its folder: use letters,
    digits and hyphens."""
    names = tuple(sorted(os.listdir(APP_TEMPLATE)))
    claim_out_dir(folder, overwrite=overwrite, resumable=False, what=f"the app's files ({', '.join(names)})",
                  outputs=lambda name: name in names)
    os.makedirs(folder, exist_ok=True)
    for name in names:
        if name != "pyproject.toml":
            with open(os.path.join(APP_TEMPLATE, name), "rb") as f:
                atomic_write_bytes(os.path.join(folder, name), f.read())
    atomic_write_text(os.path.join(folder, "pyproject.toml"), app_pyproject(app_config() if values is None else values))
    return folder
