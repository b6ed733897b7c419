"""One factor for every real-time allowance in the suite.

Time logic is tested through the sans-I/O core with explicit ``now``; what remains are tests on
real sockets, where the kernel and the event loop take real time. Their allowances (how late a
close may come, how long to wait for a condition) are written for a quiet 2-core machine and
scaled by one factor, ``KEEPCONN_TIME_FACTOR`` (default 1), so that a slower or loaded machine
can run the same suite without anyone widening a bound by hand: ``KEEPCONN_TIME_FACTOR=3 make
pytest``. Lower bounds ("never before the deadline") are promises of the code, not allowances,
and are never scaled.
"""

from __future__ import annotations

import os

from keepconn import ConfigError


def _factor() -> float:
    raw = os.environ.get("KEEPCONN_TIME_FACTOR", "1")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"KEEPCONN_TIME_FACTOR must be a number, got {raw!r}") from None
    if not value >= 1:
        raise ConfigError(f"KEEPCONN_TIME_FACTOR must be >= 1, got {raw!r}")
    return value


#: The factor every real-time allowance is multiplied by.
FACTOR = _factor()


def slack(seconds: float) -> float:
    """An allowance of ``seconds`` on a quiet machine, scaled for this one."""
    return seconds * FACTOR
