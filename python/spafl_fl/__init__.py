"""spafl_fl: the SpaFL federated loop on ``spafl_kernels`` layers, with FedAvg and masked-dense
baselines, bits/FLOPs/latency accounting, checkpoints, and the ``spafl-fl`` CLI.

Reusable pieces: ``SpaFLClient``/``FedAvgClient`` (local training, updates, evaluation), ``Server``
(sampling, validation, aggregation), ``Simulation`` (the in-process loop), ``build_model``,
``load_dataset``/``split_dirichlet``.
"""

from spafl_kernels import _version

from .client import (
    ClientUpdate,
    FedAvgClient,
    LocalClient,
    LocalTraining,
    SpaFLClient,
    evaluate,
    make_batches,
    train_local,
)
from .config import ALGORITHMS, GLOBAL_UPDATES, PRESETS, RunConfig
from .data import DATASETS, ClientData, Dataset, load_dataset, split_dirichlet
from .models import MODELS, build_model
from .server import Aggregate, Server, update_problems
from .simulation import SUMMARY_KEYS, Simulation, summarize

__version__ = _version.__version__

__all__ = [
    "__version__",
    "ALGORITHMS",
    "DATASETS",
    "MODELS",
    "PRESETS",
    "SUMMARY_KEYS",
    "Aggregate",
    "ClientData",
    "ClientUpdate",
    "Dataset",
    "FedAvgClient",
    "GLOBAL_UPDATES",
    "LocalClient",
    "LocalTraining",
    "RunConfig",
    "Server",
    "Simulation",
    "SpaFLClient",
    "build_model",
    "evaluate",
    "load_dataset",
    "make_batches",
    "split_dirichlet",
    "summarize",
    "train_local",
    "update_problems",
]
