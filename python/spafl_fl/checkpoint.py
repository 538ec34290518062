"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is ``checkpoint-<round>.safetensors`` plus ``checkpoint.json``, which names that file
and is replaced last (write to a temporary file, fsync, ``os.replace``): a crash at any point leaves
the previous checkpoint whole and pointed at. Older tensor files are removed only afterwards.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable

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


def _atomic_replace(path: str, write: Callable[[str], None]) -> None:
    """Let ``write(tmp)`` create a temporary file next to ``path``, make it durable, then rename it
    over ``path``: readers see the old file or the new one, never a mix."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _atomic_replace(path, write)


def save_checkpoint(folder: str, round_done: int, tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """Save ``tensors`` (name -> tensor) and ``meta`` (JSON-able) as the checkpoint after
    ``round_done`` completed rounds. Returns the tensor file's path."""
    name = f"checkpoint-{round_done:06d}.safetensors"
    path = os.path.join(folder, name)
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_replace(path, lambda tmp: save_file(cpu, tmp))
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
