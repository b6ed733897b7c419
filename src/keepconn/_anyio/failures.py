"""What ended a connection: one map from exceptions (and groups of them) to a kind of failure.

The server's and the client's connections each turn a :class:`Failure` into their own reason
enum (``CloseReason``, ``DisconnectReason``) with a table of their own; which exception means
which failure is decided here alone, so the two sides cannot drift apart.
"""

from __future__ import annotations

import enum
import errno
import ssl

import anyio

from .._core.errors import HelloRejected, ProtocolError, SessionClosed

__all__ = ["TRANSPORT_ERRORS", "Failure", "errno_of", "errors_in", "failure_of", "first_failure"]

#: What a read or write on a stream raises when the connection itself has failed.
TRANSPORT_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class Failure(enum.Enum):
    """The kinds of end an exception can stand for."""

    #: The peer closed its side (EOF).
    EOF = "eof"
    #: The peer's bytes broke the framing or the protocol.
    PROTOCOL = "protocol"
    #: The application refused the hello (HelloRejected).
    REJECTED = "rejected"
    #: Our own side closed the stream or the session (SessionClosed, ClosedResourceError).
    CLOSED = "closed"
    #: The kernel gave up on the socket (ETIMEDOUT: keepalive probes or TCP_USER_TIMEOUT).
    TIMED_OUT = "timed_out"
    #: The connection was reset or broke (ECONNRESET, EPIPE, ...).
    BROKEN = "broken"
    #: The TLS handshake failed (certificate, protocol version, plaintext on a TLS port).
    #: Only the handshake reports it: once it is done, TLS errors are the peer's PROTOCOL.
    TLS = "tls"
    #: Anything else: an application bug, not a network failure.
    OTHER = "other"


def failure_of(exc: BaseException) -> tuple[Failure, str]:
    """The failure an exception stands for, with words for the close's detail."""
    exc = _unwrap(exc)
    if isinstance(exc, anyio.EndOfStream):
        return Failure.EOF, ""
    if isinstance(exc, ProtocolError):
        return Failure.PROTOCOL, str(exc)
    if isinstance(exc, HelloRejected):
        return Failure.REJECTED, str(exc)
    if isinstance(exc, SessionClosed):
        return Failure.CLOSED, str(exc)
    if isinstance(exc, anyio.ClosedResourceError):
        # Only our own side closes a stream, and it records a reason first; this is the
        # fallback for an application that closed it behind the connection's back.
        return Failure.CLOSED, "stream closed"
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLSyscallError):
        # A TLS record that does not decrypt or an alert from the peer: its bytes broke the
        # protocol. (Its errno is an OpenSSL code, not an OS one.)
        return Failure.PROTOCOL, f"TLS: {exc.reason or exc}"
    code = errno_of(exc)
    if code == errno.ETIMEDOUT:
        return Failure.TIMED_OUT, "ETIMEDOUT"
    if code is not None or isinstance(exc, anyio.BrokenResourceError):
        return Failure.BROKEN, errno.errorcode.get(code, "broken") if code is not None else "broken"
    return Failure.OTHER, f"{type(exc).__name__}: {exc}"


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


def first_failure(errors: list[Exception]) -> tuple[Failure, str]:
    """One failure for several (the handler and the ping task may both see a reset): the first
    that names a network or protocol failure, CLOSED or OTHER only if none does."""
    found = [failure_of(error) for error in errors]
    for failure, detail in found:
        if failure not in (Failure.CLOSED, Failure.OTHER):
            return failure, detail
    return found[0]
