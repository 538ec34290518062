"""Which exact path the ``cpp`` backend takes per call signature, and how a run keeps its choices.

Where a call can run two exact ways (the row-skipping kernels or masked dense, the dense product with pruned
rows zeroed plus the STE formula; oneDNN or im2col for a one-channel convolution's weight gradient), the
first call of each signature times both and keeps the faster (csrc/cpu/paths.h). A signature is the op and
pass, dtype, thread count, shapes (the batch size bucketed: exact to 16, then powers of two), bias, STE, the
gradients asked for and the active (and graded) rows in sixteenths. Both paths match ``reference``, but not
always to the bit, so a choice made by the clock could change a run's numbers from one run to the next. This
module keeps them fixed:

- the table is saved per machine (``cache_file()``: keyed by CPU model, torch and package version; JSON,
  atomic writes, merged with what another process saved) and loaded when the ``cpp`` backend is imported,
  so that a rerun of the same seed replays every choice;
- ``export_table()`` / ``import_table()`` let a run record its table (``spafl-fl run`` writes it into its
  checkpoint and ``kernel-paths.json``) and replay it on ``--resume``.

Settings: ``SPAFL_CPU_PATH=skip|dense|auto`` pins the path of every call (read per call; nothing is timed or
recorded while pinned); ``SPAFL_CPU_CONV_DW=onednn|im2col`` pins the one-channel weight gradient;
``SPAFL_PATH_CACHE`` names the cache file, or ``off`` for none; ``SPAFL_CPU_TIMED_CHOICE=first|second``
makes every first-sight timing report that outcome (tests and benchmarks).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import platform
import tempfile

import torch

from ._ext import extension_available

KINDS = ("linear_fwd", "linear_bwd", "conv2d_fwd", "conv2d_bwd", "conv2d_dw")
"""The kinds of choice, by their code in csrc/cpu/paths.h (ChoiceKind)."""

CHOICES = {kind: ("skip", "dense") for kind in KINDS[:4]} | {"conv2d_dw": ("onednn", "im2col")}
"""The two ways of each kind, by their code (0, 1)."""

# Names of a key's integers after kind, dtype and thread count (csrc/cpu/linear.cpp, conv2d.cpp); a batch
# size is bucketed (batch_bucket).
_GEOMETRY = ("stride_h", "stride_w", "pad_h", "pad_w", "dilation_h", "dilation_w", "groups")
_FIELDS = {
    "linear_fwd": ("M_bucket", "K", "N", "bias", "active"),
    "linear_bwd": ("M_bucket", "K", "N", "bias", "ste", "need_dx", "need_params", "active", "graded"),
    "conv2d_fwd": ("B_bucket", "C", "H", "W", "N", "Cg", "kh", "kw") + _GEOMETRY + ("bias", "active"),
    "conv2d_bwd": ("B_bucket", "C", "H", "W", "N", "Cg", "kh", "kw") + _GEOMETRY
    + ("bias", "ste", "need_dx", "need_params", "active", "graded"),
    "conv2d_dw": ("B_bucket", "H", "W", "N", "Cg", "kh", "kw", "stride_h", "pad_h", "dilation_h", "stride_w", "pad_w",
                  "dilation_w"),
}
_DTYPES = {6: "float32", 7: "float64"}  # c10::ScalarType codes


def _ops():
    if not extension_available():
        raise RuntimeError("spafl_kernels.paths: the extension spafl_kernels._C is not built")
    return torch.ops.spafl


def export_table() -> list[dict]:
    """Every recorded choice: ``[{"kind": str, "key": [int, ...], "choice": str}]`` (key: dtype, threads,
    then the kind's fields); empty without the extension."""
    if not extension_available():
        return []
    entries = []
    for line in _ops().paths_export().splitlines():
        numbers = [int(v) for v in line.split()]
        kind = KINDS[numbers[0]]
        entries.append({"kind": kind, "key": numbers[1:-1], "choice": CHOICES[kind][numbers[-1]]})
    return entries


def _lines(entries: list[dict]) -> str:
    lines = []
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) != {"kind", "key", "choice"}:
            raise ValueError(f"a path choice must be {{'kind', 'key', 'choice'}}, got {entry!r}")
        kind, key, choice = entry["kind"], entry["key"], entry["choice"]
        if kind not in CHOICES or choice not in CHOICES[kind]:
            raise ValueError(f"not a path choice: kind {kind!r}, choice {choice!r}")
        if not isinstance(key, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in key):
            raise ValueError(f"a path choice's key must be a list of ints, got {key!r}")
        lines.append(" ".join(str(v) for v in [KINDS.index(kind), *key, CHOICES[kind].index(choice)]))
    return "\n".join(lines)


def import_table(entries: list[dict], replace: bool = False) -> None:
    """Add recorded choices (``export_table``'s form). A signature already in the table keeps its choice,
    unless ``replace`` (then ``entries`` win: replaying a run's own table)."""
    text = _lines(entries)
    if not extension_available():
        return
    if replace:
        kept = _ops().paths_export()
        _ops().paths_clear()
        _ops().paths_import(text)
        _ops().paths_import(kept)
    else:
        _ops().paths_import(text)


def clear_table() -> None:
    """Forget every choice (the next call of each signature is timed again)."""
    if extension_available():
        _ops().paths_clear()


def describe(entry: dict) -> str:
    """One line for a choice: ``linear_fwd float32 threads=2 M_bucket=64 K=400 N=120 bias=1 active=8/16 -> dense``."""
    kind, key = entry["kind"], entry["key"]
    parts = [kind, _DTYPES.get(key[0], f"dtype{key[0]}"), f"threads={key[1]}"]
    for name, value in zip(_FIELDS[kind], key[2:]):
        if name in ("active", "graded"):
            value = {0: "0", 17: "all"}.get(value, f"{value}/16")
        parts.append(f"{name}={value}")
    return " ".join(parts) + f" -> {entry['choice']}"


# ------------------------------------------------------------------------------ per-machine cache


def machine() -> dict:
    """What a cached choice is valid for: CPU model, torch and package version."""
    from . import __version__

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "torch": torch.__version__, "spafl_kernels": __version__}


def cache_file() -> str | None:
    """The cache of this machine: ``SPAFL_PATH_CACHE``, or ``paths-<hash of machine()>.json`` in
    ``$XDG_CACHE_HOME/spafl_kernels`` (``~/.cache``); None when ``SPAFL_PATH_CACHE=off``."""
    setting = os.environ.get("SPAFL_PATH_CACHE", "")
    if setting == "off":
        return None
    if setting:
        return setting
    digest = hashlib.sha256(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:16]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "spafl_kernels", f"paths-{digest}.json")


def _read_cache(path: str) -> list[dict]:
    """The choices in ``path`` when it is this machine's; [] when missing, unreadable or another machine's."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict) or data.get("machine") != machine() or not isinstance(data.get("choices"), list):
        return []
    try:
        _lines(data["choices"])
    except ValueError:
        return []
    return data["choices"]


def load_cache() -> int:
    """Import this machine's cached choices (kept ones win); returns how many the file held."""
    path = cache_file()
    entries = _read_cache(path) if path else []
    import_table(entries)
    return len(entries)


def save_cache() -> str | None:
    """Merge the table into the cache file (its entries win: another process may have saved first) with an
    atomic replace; returns the path, or None when off, unchanged or not writable."""
    path = cache_file()
    if path is None or not extension_available():
        return None
    saved = _read_cache(path)
    known = {(e["kind"], tuple(e["key"])) for e in saved}
    new = [e for e in export_table() if (e["kind"], tuple(e["key"])) not in known]
    if not new:
        return None
    tmp = None
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".paths-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"machine": machine(), "choices": saved + new}, f, indent=0)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        return None
    return path


_LOADED = False


def load_cache_once() -> None:
    """On the first import of the ``cpp`` backend: load the cache, and save the table at exit."""
    global _LOADED
    if _LOADED or not extension_available():
        return
    _LOADED = True
    load_cache()
    atexit.register(save_cache)


def row_bucket(count: int, rows: int) -> int:
    """Active rows as a signature bucket: 0 (none), 1-16 (sixteenths, rounded up), 17 (all); as paths.h."""
    if count <= 0:
        return 0
    return 17 if count >= rows else 1 + (count * 16 - 1) // rows


def batch_bucket(m: int) -> int:
    """A batch size as a signature bucket: exact up to 16, else the next power of two; as paths.h."""
    if m <= 16:
        return m
    bucket = 16
    while bucket < m:
        bucket *= 2
    return bucket


def used_paths(op: str, x_shape, w_shape, active: int) -> str:
    """The recorded paths of a layer call (``op`` "linear" or "conv2d", ``active`` of ``w_shape[0]`` rows):
    ``"fwd dense, bwd skip"``; a pass not recorded (not run, or pinned) reads ``-``."""
    shape = [*x_shape, *w_shape] if op == "conv2d" else [x_shape[0], x_shape[1], w_shape[0]]
    shape[0] = batch_bucket(shape[0])
    bucket = row_bucket(active, w_shape[0])
    found = {}
    for entry in export_table():
        kind = entry["kind"]
        if kind not in (f"{op}_fwd", f"{op}_bwd"):
            continue
        fields = dict(zip(_FIELDS[kind], entry["key"][2:]))
        if [fields[name] for name in _FIELDS[kind][:len(shape)]] == shape and fields["active"] == bucket:
            found.setdefault(kind.split("_")[1], set()).add(entry["choice"])
    return ", ".join(f"{p} {'/'.join(sorted(found[p])) if p in found else '-'}" for p in ("fwd", "bwd"))
