"""``python -m spafl_kernels.bench``: the ``spafl-bench`` command."""

from .cli import main

main()
