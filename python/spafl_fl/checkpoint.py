"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is ``checkpoint-<round>.safetensors`` plus ``checkpoint.json``, which names that file
and is replaced last (write to a temporary file, fsync, ``os.replace``): a crash at any point leaves
the previous checkpoint whole and pointed at. The previous tensor file (the one the old
``checkpoint.json`` named) is removed only afterwards; no other file is ever removed.

Every file the federated tools write gets one mode: ``0o666`` less the process umask (``0644`` under
the usual umask 022), as a plain ``open()`` gives, so a user's umask decides who may read a run.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

POINTER = "checkpoint.json"
TENSOR_FILE = re.compile(r"checkpoint-(\d{6})\.safetensors")
"""The only names a checkpoint's tensor file may have: a plain file name in the run folder."""


class CheckpointError(ValueError):
    """A checkpoint (or a run file next to it) that cannot be used; the message names the file."""


def file_mode() -> int:
    """The mode of every file written: what ``open()`` gives under the process's umask now."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


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
        os.chmod(tmp, file_mode())  # mkstemp creates 0600; every output gets the same mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically; a symbolic link at ``path`` is replaced, never followed."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``, which
    replaces a symbolic link at ``path`` itself: an output never goes through a link)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic_replace(path, write)


def open_append(path: str, encoding: str | None = "utf-8", binary: bool = False):
    """``path`` opened for appending text (bytes with ``binary``), created with the mode ``open()`` gives;
    refuses (``OSError`` naming the file) when ``path`` is a symbolic link instead of writing where it points."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    if os.path.islink(path):  # also where the platform has no O_NOFOLLOW
        raise OSError(errno.ELOOP, f"{path} is a symbolic link; an output is never written through a link")
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{path} is a symbolic link; an output is never written through a link") \
                from None
        raise
    return os.fdopen(fd, "ab") if binary else os.fdopen(fd, "a", encoding=encoding)


def append_line(path: str, line: str, durable: bool = True) -> None:
    """Append ``line`` and a newline to ``path`` (``open_append``), flushed to disk when ``durable``."""
    with open_append(path) as f:
        f.write(line + "\n")
        f.flush()
        if durable:
            os.fsync(f.fileno())


def read_json_object(path: str, keys: tuple[str, ...] = ()) -> dict:
    """The JSON object in ``path``, with at least ``keys``; ``CheckpointError`` naming the file otherwise."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is damaged ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} is damaged: expected a JSON object")
    missing = [key for key in keys if key not in value]
    if missing:
        raise CheckpointError(f"{path} is damaged: missing {missing}")
    return value


def _read_pointer(folder: str) -> dict | None:
    """checkpoint.json of ``folder``, checked: ``{"round": int >= 0, "tensors": a name matching
    ``TENSOR_FILE`` for that round, "meta": dict}``; None when there is no checkpoint.json."""
    pointer = os.path.join(folder, POINTER)
    if not os.path.exists(pointer):
        return None
    record = read_json_object(pointer, ("round", "tensors", "meta"))
    rounds, name, meta = record["round"], record["tensors"], record["meta"]
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
        raise CheckpointError(f"{pointer} is damaged: 'round' must be an integer >= 0, got {rounds!r}")
    if not isinstance(name, str) or TENSOR_FILE.fullmatch(name) is None or int(name[11:17]) != rounds:
        # A path here could point anywhere ("../x", "/etc/..."): only the name this module writes is read.
        raise CheckpointError(f"{pointer} is damaged: 'tensors' must be checkpoint-{rounds:06d}.safetensors "
                              f"in the run folder, got {name!r}")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{pointer} is damaged: 'meta' must be a JSON object")
    return record


def save_checkpoint(folder: str, round_done: int, tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """Save ``tensors`` (name -> tensor) and ``meta`` (JSON-able) as the checkpoint after
    ``round_done`` completed rounds. Returns the tensor file's path."""
    try:
        previous = _read_pointer(folder)
    except CheckpointError:
        previous = None  # the new checkpoint replaces a damaged pointer; its old tensor file is left alone
    name = f"checkpoint-{round_done:06d}.safetensors"
    path = os.path.join(folder, name)
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_replace(path, lambda tmp: save_file(cpu, tmp))
    atomic_write_text(os.path.join(folder, POINTER),
                      json.dumps({"round": round_done, "tensors": name, "meta": meta}, indent=1))
    # Only now is the new checkpoint complete; remove the one it replaces (a file this code wrote).
    if previous is not None and previous["tensors"] != name:
        old = os.path.join(folder, previous["tensors"])
        if os.path.isfile(old):
            os.remove(old)
    return path


def load_checkpoint(folder: str) -> tuple[int, dict[str, torch.Tensor], dict] | None:
    """``(rounds done, tensors, meta)`` of the checkpoint in ``folder``; None when there is none.
    Raises ``CheckpointError`` naming the file when checkpoint.json or the tensor file is damaged
    (unreadable, truncated, a name outside the folder, non-finite floating values)."""
    record = _read_pointer(folder)
    if record is None:
        return None
    path = os.path.join(folder, record["tensors"])
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} (named by {os.path.join(folder, POINTER)}) is missing")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path} is damaged ({error}); the checkpoint cannot be read") from None
    bad = sorted(name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise CheckpointError(f"{path} is damaged: non-finite values in {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    return record["round"], tensors, record["meta"]

