"""``python -m qdqsurgeon``: the same CLI as the ``qdqsurgeon`` script."""

from qdqsurgeon.cli import main

main()
