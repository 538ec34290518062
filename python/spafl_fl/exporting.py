"""``spafl-fl export``: one client's personalised model from a run's checkpoint, as a smaller plain PyTorch model.

Files written for ``--out FILE`` (``FILE`` ends in ``.safetensors``; ``STEM`` is ``FILE`` without it):

- ``FILE``: the exported model's weights and buffers (safetensors; its metadata names the architecture file);
- ``STEM.py``: the architecture, ``class ExportedModel(nn.Module)``, needing torch only;
- ``STEM.pt2``: the same model as a ``torch.export`` program (batch size dynamic), where torch.export can trace it;
- ``STEM.report.json`` / ``STEM.report.md``: what the export did per layer, and the client's test accuracy of the
  sparse model and of the export (checked equal before anything is written).

Nothing existing is replaced without ``overwrite``; no output is written through a symbolic link.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import fields

import torch
from torch import nn

from spafl_kernels.export import ExportReport, export_dense_with_report, standalone_source

from .checkpoint import _atomic_replace, atomic_write_text, load_checkpoint, read_json_object
from .client import evaluate
from .config import RunConfig
from .data import ClientData
from .simulation import prepare_run

SUFFIXES = (".py", ".pt2", ".report.json", ".report.md")


def output_paths(out: str) -> dict[str, str]:
    """The files ``export`` writes for ``--out out``: keys ``weights`` and the ``SUFFIXES``."""
    if not out.endswith(".safetensors") or out == ".safetensors":
        raise ValueError(f"--out must name a .safetensors file, got {out!r}")
    stem = out[: -len(".safetensors")]
    return {"weights": out, **{suffix: stem + suffix for suffix in SUFFIXES}}


def check_outputs(paths: dict[str, str], overwrite: bool) -> None:
    """Raise (a one-line reason) unless every path may be written: its folder exists, no path is a symbolic link,
    and without ``overwrite`` none exists."""
    folder = os.path.dirname(os.path.abspath(paths["weights"]))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--out: folder {folder} does not exist; create it first")
    links = [p for p in paths.values() if os.path.islink(p)]
    if links:
        raise ValueError(f"--out: {', '.join(links)} is a symbolic link; outputs are never written through one")
    existing = [p for p in paths.values() if os.path.exists(p)]
    not_files = [p for p in existing if not os.path.isfile(p)]
    if not_files:
        raise IsADirectoryError(f"--out: {', '.join(not_files)} exists and is not a file")
    if existing and not overwrite:
        raise FileExistsError(f"--out: {', '.join(existing)} exists; pass --overwrite to replace it, or choose "
                              "another --out")


def load_client_models(run_dir: str, clients: list[int]) -> tuple[list[nn.Module], list[ClientData], RunConfig]:
    """The models of ``clients`` (their state in the run's last checkpoint, eval mode), their data and the run's
    config; the data is loaded and split once."""
    if not os.path.isdir(run_dir):
        raise ValueError(f"{run_dir} is not a run folder (no such folder)")
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{run_dir} is not a run folder: config.json is missing")
    saved = read_json_object(config_path, ("algorithm", "model", "dataset", "clients"))
    known = {f.name for f in fields(RunConfig)}
    config = RunConfig.from_dict({k: v for k, v in saved.items() if k in known} | {"device": "cpu", "threads": 0})
    if config.algorithm == "fedavg":
        raise ValueError(f"{run_dir} is a FedAvg run: its clients hold no models of their own (export a SpaFL or "
                         "Local run)")
    bad = [k for k in clients if not 0 <= k < config.clients]
    if bad:
        raise ValueError(f"--client must be in [0, {config.clients - 1}] for {run_dir} ({config.clients} clients), "
                         f"got {bad[0]}")
    found = load_checkpoint(run_dir)
    if found is None:
        raise ValueError(f"{run_dir} has no checkpoint (checkpoint.json is missing)")
    rounds, tensors, _ = found
    setup = prepare_run(config, torch.device("cpu"))
    models = []
    for client in clients:
        model = copy.deepcopy(setup.init)
        prefix = f"client.{client}."
        try:
            model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        except RuntimeError as error:
            raise ValueError(f"the checkpoint of {run_dir} (round {rounds}) does not fit its config.json: "
                             f"{str(error).splitlines()[0]}") from None
        models.append(model.eval())
    return models, [setup.client_data[k] for k in clients], config


def load_client_model(run_dir: str, client: int) -> tuple[nn.Module, ClientData, RunConfig]:
    """Client ``client``'s model (its state in the run's last checkpoint), its data and the run's config."""
    models, data, config = load_client_models(run_dir, [client])
    return models[0], data[0], config


def export_client(run_dir: str, client: int, out: str, overwrite: bool = False) -> tuple[ExportReport, dict]:
    """Export client ``client`` of the run in ``run_dir`` into the files of ``output_paths(out)``.
    Returns the report and the record written as JSON (accuracies, files, what was skipped)."""
    paths = output_paths(out)
    check_outputs(paths, overwrite)
    model, data, config = load_client_model(run_dir, client)
    example = data.x_test[:2]
    exported, report = export_dense_with_report(model, example)
    sparse_acc, _ = evaluate(model, data)
    exported_acc, _ = evaluate(exported, data)
    if sparse_acc != exported_acc:
        raise RuntimeError(f"the exported model's test accuracy {exported_acc:.4f} % differs from the sparse model's "
                           f"{sparse_acc:.4f} %; nothing was written")
    source = standalone_source(exported)
    program, pt2_problem = None, None
    try:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        program = torch.export.export(exported, (example,), dynamic_shapes=({0: batch},))
    except Exception as error:  # torch.export refuses many graph shapes; the .py + weights still rebuild the model
        pt2_problem = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    record = {"run": os.path.abspath(run_dir), "client": client, "model": config.model, "dataset": config.dataset,
              "test_samples": int(data.y_test.shape[0]), "sparse_test_accuracy": sparse_acc,
              "exported_test_accuracy": exported_acc, "architecture": os.path.basename(paths[".py"]),
              "class": "ExportedModel", "torch_export": None if program is None else os.path.basename(paths[".pt2"]),
              "torch_export_problem": pt2_problem, "torch_version": torch.__version__, **report.to_dict()}
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in exported.state_dict().items()}
    meta = {"architecture": record["architecture"], "class": "ExportedModel", "client": str(client)}
    atomic_write_text(paths[".py"], source)
    _atomic_replace(paths["weights"], lambda tmp: save_file(state, tmp, metadata=meta))
    if program is not None:
        _atomic_replace(paths[".pt2"], lambda tmp: torch.export.save(program, tmp))
    elif os.path.isfile(paths[".pt2"]):  # --overwrite: a program of an earlier export would not match these weights
        os.remove(paths[".pt2"])
    atomic_write_text(paths[".report.json"], json.dumps(record, indent=1))
    title = f"# Export of client {client} of {run_dir} ({config.model} on {config.dataset})\n\n"
    accuracy = (f"Test accuracy on the client's {record['test_samples']} test samples: sparse {sparse_acc:.2f} %, "
                f"exported {exported_acc:.2f} %.\n\n")
    atomic_write_text(paths[".report.md"], title + accuracy + report.markdown() + "\n")
    record["files"] = [p for key, p in paths.items() if key != ".pt2" or program is not None]
    return report, record
