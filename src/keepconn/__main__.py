"""``python -m keepconn``: the same as the ``keepconn`` command."""

from __future__ import annotations

from ._tools.cli import main

raise SystemExit(main())
