"""``python -m gateway``: the same as the ``modelgate`` command."""

from __future__ import annotations

from gateway.cli import main

main()
