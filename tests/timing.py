"""One factor for every real-time allowance in the suite.

Time logic is tested through the sans-I/O core with explicit ``now``; what remains are tests on
real sockets, where the kernel and the event loop take real time. Their allowances (how late a
close may come, how long to wait for a condition) are written for a quiet 2-core machine and
scaled by one factor, ``KEEPCONN_TIME_FACTOR`` (default 1), so that a slower or loaded machine
can run the same suite without anyone widening a bound by hand: ``KEEPCONN_TIME_FACTOR=3 make
pytest``. Lower bounds ("never before the deadline") are promises of the code, not allowances,
and are never scaled; measured from outside the server they give only the event loop's clock
grain (``not_before``).
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


#: How much earlier than ``time.monotonic()`` an event loop's clock may end a span. uvloop's
#: ``loop.time()`` is libuv's millisecond clock: it truncates, so a reading taken 0.9 ms into a
#: millisecond says 0, and a deadline ``t`` after it can fire ``t`` - 0.9 ms later by the
#: monotonic clock. Seen in CI as a 0.5 s idle reap measured at 0.49983 s from the client's side.
CLOCK_GRAIN = 0.001


def not_before(deadline: float) -> float:
    """The lowest a span measured from outside may be for an event ending at ``deadline``."""
    return deadline - CLOCK_GRAIN
