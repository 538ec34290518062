"""The run folder (``--out``): what a run may write there, and reading back what it wrote.

A run never deletes or overwrites a file it did not write (docs/DESIGN.md §8). A fresh run takes an empty or
new folder only; ``resume`` continues the run found there; ``overwrite`` replaces the files a previous
run wrote (``OUTPUT_NAMES`` and its checkpoint tensor files) and keeps every other file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping

import torch

from spafl_kernels.paths import import_table
from spafl_kernels.whole_model import mapping_problems

from .checkpoint import POINTER, TENSOR_FILE, CheckpointError, load_checkpoint, open_append
from .config import RunConfig

log = logging.getLogger("spafl_fl")

METRICS = "metrics.jsonl"
PLOTS = ("accuracy.png", "density.png", "bits.png", "time.png")
OUTPUT_NAMES = ("config.json", METRICS, "summary.json", POINTER, "run.log", "kernel-paths.json", *PLOTS)
RECORD_KEYS = ("round", "accuracy", "density", "uplink_bits", "downlink_bits", "dense_uplink_bits", "train_flops",
               "dense_train_flops", "paper_train_flops", "train_seconds", "baseline_train_seconds")
"""Keys every metrics record has (what summaries, plots and ``compare`` read)."""
NUMBER_KEYS = ("accuracy", "uplink_bits", "downlink_bits", "dense_uplink_bits", "train_flops", "dense_train_flops",
               "paper_train_flops", "train_seconds")
OPTIONAL_NUMBER_KEYS = ("baseline_train_seconds", "weight_density", "mean_row_density", "authors_train_flops",
                        "authors_flops_per_client")
"""Record keys whose values are finite numbers (the optional ones may also be null or absent)."""
DEPLOYMENT_NAMES = ("status.json", "deployment.json")
"""What a Flower deployment writes into the run folder besides the files of a run."""
DEPLOYMENT_FOLDER = "deployment"
"""``spafl-fl deploy-local``'s own subfolder of the run folder (the app, FLWR_HOME, logs, the nodes' state)."""


def ours(name: str) -> bool:
    """Whether ``name`` is a file name a run writes."""
    return name in OUTPUT_NAMES or TENSOR_FILE.fullmatch(name) is not None


def deployment_output(name: str) -> bool:
    """Whether ``name`` is a file name a Flower deployment writes into its run folder."""
    return ours(name) or name in DEPLOYMENT_NAMES


def claim_out_dir(out_dir: str, *, resume: bool = False, overwrite: bool = False, resumable: bool = True,
                  what: str = "what a previous spafl-fl run wrote", outputs: Callable[[str], bool] = ours,
                  ignore: tuple[str, ...] = ()) -> None:
    """Check that a run may write into ``out_dir``; raises (``ValueError``/``OSError`` with the reason and
    what to do) without touching anything. ``resumable``: the command has ``--resume``; ``what``: the
    files ``--overwrite`` replaces, for the message; ``outputs``: whether a file name is one the command
    writes (none of them may be a symbolic link: an output is never written through a link);
    ``ignore``: entries the caller itself made there (they do not make the folder non-empty)."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: resume continues the run in --out, "
                         "overwrite replaces it")
    if not out_dir:
        raise ValueError("--out is empty; name a folder")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{out_dir} is a file, not a folder")
    if resume:
        if not os.path.isfile(os.path.join(out_dir, POINTER)):
            raise FileNotFoundError(f"--resume: no checkpoint in {out_dir} ({POINTER} is missing); "
                                    "run without --resume to start a run there")
    elif os.path.isdir(out_dir):
        entries = sorted(set(os.listdir(out_dir)) - set(ignore))
        if entries and not overwrite:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise FileExistsError(
                f"{out_dir} is not empty ({shown}); nothing there is overwritten without consent: "
                + ("pass --resume to continue the run there, " if resumable else "pass ")
                + f"--overwrite to replace {what} (other files are kept), or choose another folder")
    if os.path.isdir(out_dir):
        links = sorted(name for name in os.listdir(out_dir) if outputs(name)
                       and os.path.islink(os.path.join(out_dir, name)))
        if links:
            raise FileExistsError(f"{os.path.join(out_dir, links[0])} is a symbolic link; an output is never "
                                  "written through a link: remove it, or choose another folder")
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise PermissionError(f"{out_dir} is not writable")


def log_handler(path: str) -> logging.Handler:
    """A handler that appends the run's log to ``path`` (never through a symbolic link), attached to the
    ``spafl_fl`` logger; remove it with ``close_log``."""

    class _Handler(logging.FileHandler):
        def _open(self):
            return open_append(self.baseFilename, self.encoding)

    handler = _Handler(path, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.stream = handler._open()  # opened now: a link is refused before the run starts
    log.addHandler(handler)
    return handler


def close_log(handler: logging.Handler) -> None:
    log.removeHandler(handler)
    handler.close()


def clear_outputs(out_dir: str, outputs: Callable[[str], bool] = ours) -> list[str]:
    """Remove the files a previous run wrote in ``out_dir`` (the names ``outputs`` accepts, default
    ``OUTPUT_NAMES`` and checkpoint tensor files); every other file stays. Returns the removed names."""
    if not os.path.isdir(out_dir):
        return []
    removed = []
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if outputs(name) and os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
            removed.append(name)
    return removed


def read_metrics(path: str, rounds_done: int | None = None) -> list[dict]:
    """The records of a ``metrics.jsonl``, checked: each line a JSON object with ``RECORD_KEYS`` and
    rounds ``1, 2, ...`` in order. A torn last line (a crash while it was written) is dropped.

    ``rounds_done`` (resume): the checkpoint's round count; the records must cover exactly those rounds,
    and a line for round ``rounds_done + 1`` (written before a crash kept its checkpoint) is dropped.
    Raises ``CheckpointError`` naming the file and line."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path} is damaged ({error})") from None
    lines = text.split("\n")
    torn = lines.pop()  # what follows the last newline: empty unless a write was cut short
    if torn.strip():
        log.warning("%s: dropped a torn last line (a crash while it was written)", path)
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{path} line {number} is damaged ({error})") from None
        if not isinstance(record, dict) or "round" not in record:
            raise CheckpointError(f"{path} line {number} is damaged: not a record with a 'round'")
        if not _integer(record["round"]) or record["round"] != len(records) + 1:
            seen = [r["round"] for _, r in records]
            why = "appears twice" if record["round"] in seen else f"follows round {len(records)}"
            raise CheckpointError(f"{path} line {number} is damaged: round {record['round']!r} {why}")
        records.append((number, record))
    if rounds_done is not None:
        if len(records) == rounds_done + 1:
            # The metrics line of a round is written before its checkpoint: a crash in between leaves it.
            records.pop()
        if len(records) != rounds_done:
            raise CheckpointError(f"{path} holds {len(records)} rounds but the checkpoint holds {rounds_done}")
    for number, record in records:
        missing = [key for key in RECORD_KEYS if key not in record]
        if missing:
            raise CheckpointError(f"{path} line {number} is damaged: missing {missing}")
        wrong = record_problems(record)
        if wrong:
            raise CheckpointError(f"{path} line {number} is damaged: {'; '.join(wrong)}")
    return [record for _, record in records]


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def record_problems(record: dict) -> list[str]:
    """Why the values of a metrics record (keys present) have the wrong types: one string per field."""
    problems = [f"{key} must be a finite number (got {record[key]!r})" for key in NUMBER_KEYS
                if key in record and not _finite(record[key])]
    problems += [f"{key} must be a finite number or null (got {record[key]!r})" for key in OPTIONAL_NUMBER_KEYS
                 if record.get(key) is not None and not _finite(record[key])]
    dens = record.get("density")
    if "density" in record and not (isinstance(dens, dict) and "total" in dens and all(
            isinstance(k, str) and _finite(v) for k, v in dens.items())):
        problems.append(f"density must map layer names and 'total' to finite numbers (got {dens!r})")
    return problems


def read_resume(out_dir: str, config: dict) -> tuple[int, dict[str, torch.Tensor], list[dict]]:
    """The checkpoint and metrics records in ``out_dir``, checked against ``config`` (``RunConfig.to_dict``,
    ``rounds`` at least the rounds done) before any data is loaded: ``(rounds done, tensors, records)``.
    Every engine resumes through here; errors name the file."""
    pointer = os.path.join(out_dir, POINTER)
    found = load_checkpoint(out_dir)
    if found is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out_dir}")
    rounds_done, tensors, meta = found
    saved = meta.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{pointer} is damaged: 'meta' has no 'config' object")
    # A run saved before a setting existed was made with that setting's default.
    defaults = {f: field.default for f, field in RunConfig.__dataclass_fields__.items()}
    differ = sorted(k for k in config if k != "rounds" and saved.get(k, defaults.get(k)) != config[k])
    if differ:
        raise ValueError("--resume: the run in {} was made with other settings: {}".format(
            out_dir, ", ".join(f"{k}={saved.get(k)!r} (now {config[k]!r})" for k in differ)))
    if config["rounds"] < rounds_done:
        raise ValueError(f"--resume: --rounds {config['rounds']} is fewer than the {rounds_done} rounds "
                         f"already done in {out_dir}; pass --rounds {rounds_done} or more")
    metrics = os.path.join(out_dir, METRICS)
    if not os.path.isfile(metrics):
        raise CheckpointError(f"{metrics} is missing (the checkpoint holds {rounds_done} rounds)")
    records = read_metrics(metrics, rounds_done)
    import_table(meta.get("kernel_paths", []), replace=True)  # the run's timed kernel choices, replayed
    return rounds_done, tensors, records


def check_resume_tensors(out_dir: str, rounds_done: int, tensors: Mapping[str, torch.Tensor],
                         spec: Mapping[str, torch.Tensor]) -> None:
    """Raise ``CheckpointError`` naming the tensor file unless ``tensors`` has exactly the names, shapes
    and dtypes of ``spec`` (what the run holds)."""
    problems = mapping_problems(tensors, spec, same_dtype=True)
    if problems:
        path = os.path.join(out_dir, f"checkpoint-{rounds_done:06d}.safetensors")
        raise CheckpointError(f"{path} does not fit this run: " + "; ".join(problems[:5]))
