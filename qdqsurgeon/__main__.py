"""``python -m qdqsurgeon``: the same CLI as the ``qdqsurgeon`` script."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main()
