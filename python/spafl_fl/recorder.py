"""The one run recorder every engine writes its run folder through (docs/DESIGN.md §8).

``RunRecorder`` claims the folder (new or empty, unless ``resume`` or ``overwrite``), checks a resumed run
before any data is loaded (``rundir.read_resume``: checkpoint, settings, metrics.jsonl, the kernel-path
table) and its tensors against the run (``check_resume_tensors``), writes config.json, appends each round's
record to metrics.jsonl (fsync), keeps run.log, writes a checkpoint after every round (with the run's
kernel-path table, also in kernel-paths.json) and at the end summary.json and the plots.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping

import torch

from spafl_kernels.paths import export_table

from .checkpoint import append_line, atomic_write_text, save_checkpoint
from .config import RunConfig
from .core import summarize
from .rundir import (
    METRICS,
    check_resume_tensors,
    claim_out_dir,
    clear_outputs,
    close_log,
    log_handler,
    ours,
    read_resume,
)

log = logging.getLogger("spafl_fl")


class RunRecorder:
    """The run folder ``out_dir`` of a run of ``config`` (None: record nothing, keep records in memory).

    ``outputs``: the file names the engine writes (``rundir.ours``, or ``rundir.deployment_output``);
    ``ignore``: entries the caller made there itself; ``engine``: written into config.json."""

    def __init__(self, config: RunConfig, out_dir: str | None, *, resume: bool = False, overwrite: bool = False,
                 outputs: Callable[[str], bool] = ours, ignore: tuple[str, ...] = (), engine: str | None = None,
                 what: str = "what a previous spafl-fl run wrote"):
        self.config, self.out_dir, self.engine = config, out_dir, engine
        self.records: list[dict] = []
        self.rounds_done = 0
        self.checkpointed = 0  # rounds in the checkpoint on disk
        self._found = None
        self._log: logging.Handler | None = None
        if out_dir is None:
            return
        claim_out_dir(out_dir, resume=resume, overwrite=overwrite, outputs=outputs, ignore=ignore, what=what)
        if resume:
            self._found = read_resume(out_dir, config.to_dict())
        elif overwrite:
            removed = clear_outputs(out_dir, outputs)
            if removed:
                log.info("--overwrite: removed %s of the previous run in %s", ", ".join(removed), out_dir)
        os.makedirs(out_dir, exist_ok=True)

    @property
    def resuming(self) -> bool:
        return self._found is not None

    def start(self, description: dict) -> None:
        """Write config.json (the flags and what they resolved to)."""
        if self.out_dir is not None:
            described = {**description, "engine": self.engine} if self.engine else description
            atomic_write_text(os.path.join(self.out_dir, "config.json"), json.dumps(described, indent=1))

    def resume(self, spec: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors, checked against ``spec`` (names, shapes, dtypes of what the run holds);
        the records of the rounds done are kept and metrics.jsonl rewritten without a line of a round the
        checkpoint lacks or a torn last line."""
        rounds_done, tensors, records = self._found
        check_resume_tensors(self.out_dir, rounds_done, tensors, spec)
        self.records = records
        atomic_write_text(os.path.join(self.out_dir, METRICS), "".join(json.dumps(rec) + "\n" for rec in records))
        self.rounds_done = self.checkpointed = rounds_done
        log.info("resuming %s after round %d", self.out_dir, rounds_done)
        return tensors

    def open_log(self) -> None:
        """Append the ``spafl_fl`` log to run.log (refuses a link before the run starts)."""
        if self.out_dir is not None and self._log is None:
            self._log = log_handler(os.path.join(self.out_dir, "run.log"))

    def close(self) -> None:
        if self._log is not None:
            close_log(self._log)
            self._log = None

    def record(self, record: dict) -> None:
        """Keep the round's record and append it to metrics.jsonl (flushed to disk). The line goes before the
        checkpoint: a crash in between leaves a line that resume drops, and the previous checkpoint whole."""
        self.records.append(record)
        self.rounds_done = record["round"]
        if self.out_dir is not None:
            append_line(os.path.join(self.out_dir, METRICS), json.dumps(record))

    def checkpoint(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """The checkpoint after ``rounds_done`` rounds; the kernel path choices go with it, so that --resume
        replays them (same numbers)."""
        if self.out_dir is None:
            return
        kernel_paths = export_table()
        atomic_write_text(os.path.join(self.out_dir, "kernel-paths.json"), json.dumps(kernel_paths, indent=0))
        save_checkpoint(self.out_dir, self.rounds_done, dict(tensors),
                        {"config": self.config.to_dict(), "kernel_paths": kernel_paths})
        self.checkpointed = self.rounds_done

    def finish(self, label: str) -> dict:
        """summary.json and the plots (``label``: the run's name in them); returns the summary."""
        summary = summarize(self.records, self.config.algorithm)
        if self.out_dir is not None:
            atomic_write_text(os.path.join(self.out_dir, "summary.json"), json.dumps(summary, indent=1))
            from .plots import plot_runs

            plot_runs([(label, self.records)], self.out_dir)
        return summary


class Recorded:
    """What an engine's run (``Simulation``, the Flower ``RunStrategy``) tells of its ``recorder``."""

    recorder: RunRecorder

    @property
    def records(self) -> list[dict]:
        """The records of the rounds done, the resumed ones included."""
        return self.recorder.records

    @property
    def rounds_done(self) -> int:
        return self.recorder.rounds_done

    @property
    def checkpointed(self) -> int:
        """Rounds in the checkpoint on disk."""
        return self.recorder.checkpointed
