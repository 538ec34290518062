"""``python -m spafl_fl`` is the ``spafl-fl`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
