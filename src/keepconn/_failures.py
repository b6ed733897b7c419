"""What ended a connection: exceptions (and groups of them) mapped to one CloseReason."""

from __future__ import annotations

import errno

import anyio

from ._errors import HelloRejected, ProtocolError
from ._reasons import CloseReason

__all__ = ["errno_of", "errors_in", "reason_for", "reason_for_all"]


def errno_of(exc: BaseException) -> int | None:
    """The errno behind an exception or its cause (anyio wraps OSError in BrokenResourceError)."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return None


def _unwrap(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-member exception groups: trio's nurseries wrap
    a handler's exception when it runs beside the ping task."""
    inner = getattr(exc, "exceptions", None)
    while isinstance(inner, tuple) and len(inner) == 1 and isinstance(inner[0], BaseException):
        exc = inner[0]
        inner = getattr(exc, "exceptions", None)
    return exc


def errors_in(exc: BaseException) -> list[Exception] | None:
    """The ordinary exceptions inside ``exc`` (walking exception groups), leaving out
    cancellation; None if it holds anything else that must propagate (KeyboardInterrupt...)."""
    cancelled = anyio.get_cancelled_exc_class()
    found: list[Exception] = []
    pending: list[BaseException] = [exc]
    while pending:
        item = pending.pop()
        members = getattr(item, "exceptions", None)
        if isinstance(members, tuple):
            pending.extend(m for m in members if isinstance(m, BaseException))
        elif isinstance(item, cancelled):
            continue
        elif isinstance(item, Exception):
            found.append(item)
        else:
            return None
    return found


def reason_for_all(errors: list[Exception]) -> tuple[CloseReason, str]:
    """One reason for several failures (the handler and the ping task may both see a reset):
    the first that names a network or protocol reason, APPLICATION only if none does."""
    found = [reason_for(error) for error in errors]
    for reason, detail in found:
        if reason is not CloseReason.APPLICATION:
            return reason, detail
    return found[0]


def reason_for(exc: BaseException) -> tuple[CloseReason, str]:
    """Map what ended a connection to its close reason."""
    exc = _unwrap(exc)
    if isinstance(exc, anyio.EndOfStream):
        return CloseReason.PEER_CLOSED, ""
    if isinstance(exc, ProtocolError):
        return CloseReason.PROTOCOL_ERROR, str(exc)
    if isinstance(exc, HelloRejected):
        return CloseReason.AUTH_FAILED, str(exc)
    code = errno_of(exc)
    if code == errno.ETIMEDOUT:
        # The kernel gave up: keepalive probes or TCP_USER_TIMEOUT expired.
        return CloseReason.KEEPALIVE_TIMEOUT, "ETIMEDOUT"
    if code is not None or isinstance(exc, anyio.BrokenResourceError):
        name = errno.errorcode.get(code, "broken") if code is not None else "broken"
        return CloseReason.PEER_RESET, name
    return CloseReason.APPLICATION, f"{type(exc).__name__}: {exc}"
