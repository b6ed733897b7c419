"""Public names say where users import them from.

A class defined in ``keepconn._core.registry`` but imported as ``keepconn.SessionRegistry``
should read ``keepconn.SessionRegistry`` in reprs, tracebacks, pickles and generated docs,
not the private module it happens to live in (trio does the same).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["claim"]


def claim(namespace: str, names: Iterable[str], found: Mapping[str, Any]) -> None:
    """Set ``__module__`` to ``namespace`` on each class and function of ``names``."""
    for name in names:
        obj = found[name]
        if isinstance(obj, type) or callable(obj):
            module = getattr(obj, "__module__", "")
            if module.startswith("keepconn.") and module != namespace:
                obj.__module__ = namespace
