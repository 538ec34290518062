"""``spafl-bench``: sparse layers and whole training steps against dense, masked dense and the static limit.

- ``layers``: single layers of the paper's models and the two large layers of docs/DESIGN.md §5;
- ``models``: whole training steps of the paper's models (``--models``);
- ``timing``: interleaved timing (every candidate round-robin over repetitions, medians);
- ``records``: provenance and the output files (JSON, Markdown, PNG);
- ``cli``: the command (``spafl-bench --help``, or ``python -m spafl_kernels.bench``).
"""

from __future__ import annotations

from .cli import main

__all__ = ["main"]
