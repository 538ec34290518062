"""The run folder (``--out``): what a run may write there, and reading back what it wrote.

A run never deletes or overwrites a file it did not write (DESIGN §8). A fresh run takes an empty or
new folder only; ``resume`` continues the run found there; ``overwrite`` replaces the files a previous
run wrote (``OUTPUT_NAMES`` and its checkpoint tensor files) and keeps every other file.
"""

from __future__ import annotations

import json
import logging
import os

from .checkpoint import POINTER, TENSOR_FILE, CheckpointError

log = logging.getLogger("spafl_fl")

METRICS = "metrics.jsonl"
PLOTS = ("accuracy.png", "density.png", "bits.png", "time.png")
OUTPUT_NAMES = ("config.json", METRICS, "summary.json", POINTER, "run.log", "kernel-paths.json", *PLOTS)
RECORD_KEYS = ("round", "accuracy", "density", "uplink_bits", "downlink_bits", "dense_uplink_bits", "train_flops",
               "dense_train_flops", "paper_train_flops", "train_seconds", "baseline_train_seconds")
"""Keys every metrics record has (what summaries, plots and ``compare`` read)."""


def ours(name: str) -> bool:
    """Whether ``name`` is a file name a run writes."""
    return name in OUTPUT_NAMES or TENSOR_FILE.fullmatch(name) is not None


def claim_out_dir(out_dir: str, *, resume: bool = False, overwrite: bool = False, resumable: bool = True,
                  what: str = "what a previous spafl-fl run wrote") -> None:
    """Check that a run may write into ``out_dir``; raises (``ValueError``/``OSError`` with the reason and
    what to do) without touching anything. ``resumable``: the command has ``--resume``; ``what``: the
    files ``--overwrite`` replaces, for the message."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: resume continues the run in --out, "
                         "overwrite replaces it")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{out_dir} is a file, not a folder")
    if resume:
        if not os.path.isfile(os.path.join(out_dir, POINTER)):
            raise FileNotFoundError(f"--resume: no checkpoint in {out_dir} ({POINTER} is missing); "
                                    "run without --resume to start a run there")
    elif os.path.isdir(out_dir):
        entries = sorted(os.listdir(out_dir))
        if entries and not overwrite:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise FileExistsError(
                f"{out_dir} is not empty ({shown}); nothing there is overwritten without consent: "
                + ("pass --resume to continue the run there, " if resumable else "pass ")
                + f"--overwrite to replace {what} (other files are kept), or choose another folder")
    if os.path.isdir(out_dir) and not os.access(out_dir, os.W_OK | os.X_OK):
        raise PermissionError(f"{out_dir} is not writable")


def clear_outputs(out_dir: str, names: tuple[str, ...] | None = None) -> list[str]:
    """Remove the files a previous run wrote in ``out_dir`` (``names``, default ``OUTPUT_NAMES`` and
    checkpoint tensor files); every other file stays. Returns the removed names."""
    if not os.path.isdir(out_dir):
        return []
    removed = []
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if (name in names if names is not None else ours(name)) and os.path.isfile(path) and not os.path.islink(path):
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
        if record["round"] != len(records) + 1:
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
    return [record for _, record in records]
