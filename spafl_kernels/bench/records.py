"""Records of a ``spafl-bench`` run: provenance (versions, commit, machine, time) and the output files asked for,
checked before any timing."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from collections.abc import Callable

import torch

from .._version import __version__
from ..selfcheck import cpu_model

# The package folder, and a file in it that git tracks there (source_state: is this a checkout of the package?).
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MARKER = "__init__.py"


def source_state(folder: str = _PACKAGE_DIR) -> dict:
    """``{"git_commit", "git_dirty"}`` of the checkout this package runs from (None for both when it is not a
    git checkout, e.g. an installed wheel). Dirty: uncommitted changes to tracked files outside
    benchmarks/results/ (where a run writes its own records)."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True, check=False,
                                  timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    if git("ls-files", "--error-unmatch", _MARKER) is None:  # not this package's checkout
        return {"git_commit": None, "git_dirty": None}
    top = git("rev-parse", "--show-toplevel")
    changes = git("-C", top or ".", "status", "--porcelain", "--untracked-files=no", "--", ".",
                  ":(exclude)benchmarks/results")
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": None if changes is None else bool(changes)}


def machine() -> dict:
    """What a record needs to be trusted: versions, source state, time, threads, CPU and GPU model."""
    cpu = cpu_model()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"package": __version__, **source_state(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda_version": torch.version.cuda, "threads": torch.get_num_threads(),
            "cpu": cpu, "gpu": gpu, "cuda": gpu}


def provenance(meta: dict) -> str:
    """One line for a report: package, commit (and whether the tree was dirty), time, machine."""
    commit = meta.get("git_commit")
    source = ("no git checkout" if commit is None else
              f"commit {commit[:12]}" + (" with uncommitted changes" if meta.get("git_dirty") else " (clean)"))
    gpu = f", GPU {meta['gpu']}" if meta.get("gpu") else ""
    clock = ", timed in the calling thread's CPU time" if meta.get("clock") == "thread" else ""
    return (f"spafl-kernels {meta.get('package', '?')}, {source}, measured {meta.get('timestamp', '?')}; "
            f"torch {meta['torch']}, {meta['threads']} threads, CPU {meta['cpu']}{gpu}{clock}")


def output_problem(flag: str, path: str) -> str | None:
    """Why ``path`` cannot be written by the end of a run (None when it can), checked before timing."""
    if os.path.isdir(path):
        return f"{flag} {path} is a folder; give a file name"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"{flag} {path}: folder {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"{flag} {path} is not writable"
    if flag == "--plot":
        try:
            import matplotlib.figure
        except ImportError:
            return "--plot needs matplotlib: pip install matplotlib"
        kinds = matplotlib.figure.Figure().canvas.get_supported_filetypes()
        if os.path.splitext(path)[1].lstrip(".").lower() not in kinds:
            return f"--plot {path}: the file name must end in one of {', '.join('.' + k for k in sorted(kinds))}"
    return None


def write_outputs(args, rows: list[dict], meta: dict, markdown: Callable, draw: Callable) -> None:
    """The ``--json``, ``--markdown`` (with ``markdown``) and ``--plot`` (with ``draw``) files asked for."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.markdown:
        markdown(args.markdown, rows, meta, meta["command"])
    if args.plot:
        draw(args.plot, rows)
