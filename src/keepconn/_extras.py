"""Optional backends and integrations: which extra brings each, and one clear error without it.

A user who picks ``--backend trio`` or imports :mod:`keepconn.metrics` without the package
behind it should read one line naming the extra to install, not a traceback that ends in
anyio's ``LookupError`` or a bare ``No module named``.
"""

from __future__ import annotations

import importlib.util

from ._core.errors import ConfigError, KeepconnError

__all__ = ["BACKENDS", "MissingExtra", "check_backend", "require"]


class MissingExtra(KeepconnError, ImportError):
    """An optional backend or integration was asked for, and the package behind it is missing.

    The message is one line naming the extra to install (``pip install 'keepconn[trio]'``);
    ``extra`` holds the extra's name and ``name`` (as in every :class:`ImportError`) the module
    that could not be imported. It is an :class:`ImportError`, so ``except ImportError`` still
    catches it.
    """

    def __init__(self, message: str, *, extra: str, name: str) -> None:
        super().__init__(message, name=name)
        #: The extra that installs what is missing (``"trio"``, ``"prometheus"``).
        self.extra = extra


#: Each event loop keepconn runs on -> (the module it needs, the extra that installs it);
#: asyncio needs nothing beyond the standard library.
BACKENDS: dict[str, tuple[str, str] | None] = {
    "asyncio": None,
    "uvloop": ("uvloop", "uvloop"),
    "trio": ("trio", "trio"),
}


def require(module: str, extra: str, purpose: str) -> None:
    """Raise :class:`MissingExtra` unless ``module`` can be imported.

    ``purpose`` names what needs it (``"keepconn.metrics"``, ``"the trio backend"``).
    """
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken __spec__
        found = False
    if not found:
        raise MissingExtra(
            f"{purpose} needs {module}: pip install 'keepconn[{extra}]'", extra=extra, name=module
        )


def check_backend(name: str) -> None:
    """Check that the event loop ``name`` (``"asyncio"``, ``"uvloop"`` or ``"trio"``) can run.

    Call it before ``anyio.run(..., backend=...)`` so that a missing backend fails with one line:

    >>> import keepconn
    >>> keepconn.check_backend("asyncio")
    >>> keepconn.check_backend("tokio")
    Traceback (most recent call last):
    ...
    keepconn.ConfigError: unknown backend 'tokio': choose one of asyncio, uvloop, trio

    :raises keepconn.ConfigError: ``name`` is not a backend keepconn runs on.
    :raises keepconn.MissingExtra: the backend's package is not installed (the message names
        the extra, e.g. ``pip install 'keepconn[trio]'``).
    """
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    needed = BACKENDS[name]
    if needed is not None:
        require(needed[0], needed[1], f"the {name} backend")
