"""``python -m vitconvert``: the same entry point as the ``vitconvert`` console script."""

from __future__ import annotations

from vitconvert.cli import main

if __name__ == "__main__":
    main()
