"""``python -m farebox.cli``: the ``farebox`` command."""

from farebox.cli import main

main()
