"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is ``checkpoint-<round>.safetensors`` plus ``checkpoint.json``, which names that file
and is replaced last (write to a temporary file, fsync, ``os.replace``): a crash at any point leaves
the previous checkpoint whole and pointed at. Older tensor files are removed only afterwards.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file

POINTER = "checkpoint.json"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new content, never a mix."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def save_checkpoint(folder: str, round_done: int, tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """Save ``tensors`` (name -> CPU tensor) and ``meta`` (JSON-able) as the checkpoint after
    ``round_done`` completed rounds. Returns the tensor file's path."""
    name = f"checkpoint-{round_done:06d}.safetensors"
    path = os.path.join(folder, name)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    atomic_write_text(os.path.join(folder, POINTER),
                      json.dumps({"round": round_done, "tensors": name, "meta": meta}, indent=1))
    for other in os.listdir(folder):
        if other.startswith("checkpoint-") and other.endswith(".safetensors") and other != name:
            os.remove(os.path.join(folder, other))
    return path


def load_checkpoint(folder: str) -> tuple[int, dict[str, torch.Tensor], dict] | None:
    """``(rounds done, tensors, meta)`` of the checkpoint in ``folder``; None when there is none."""
    pointer = os.path.join(folder, POINTER)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        record = json.load(f)
    tensors = load_file(os.path.join(folder, record["tensors"]))
    return int(record["round"]), tensors, record["meta"]
