"""What keepconn does to asyncio's own transports when it is done with them."""

from __future__ import annotations

import asyncio

from ..tcp._socket import abort_on_close

__all__ = ["FLUSH_WAIT", "break_transport_cycle", "close_transport"]

#: Seconds a FIN close waits for the write buffer to reach the kernel before it aborts: a peer
#: that reads nothing must not keep a closed connection's socket for ever.
FLUSH_WAIT = 2.0


def _ignore_reads() -> None:
    pass


def break_transport_cycle(wire: asyncio.Transport | None) -> None:
    """Break CPython's own reference cycle in a closed selector transport.

    asyncio's ``_SelectorSocketTransport`` (CPython 3.11) keeps a bound method of itself,
    ``_read_ready_cb``: every connection, once closed, is garbage only the cyclic collector
    frees, seven objects each (transport, its dict, the method, the socket and its wrapper,
    two address tuples). Its reader is removed before ``connection_lost`` runs, so nothing
    calls the method again; a harmless function replaces it, which breaks the cycle. uvloop's
    transports are C objects without it.
    """
    if wire is None:
        return
    reads = getattr(wire, "_read_ready_cb", None)
    if getattr(reads, "__self__", None) is wire:
        setattr(wire, "_read_ready_cb", _ignore_reads)  # noqa: B010 (private to asyncio)


def close_transport(
    wire: asyncio.Transport, loop: asyncio.AbstractEventLoop, *, reset: bool
) -> None:
    """Close ``wire``: with a RST (``reset``: the peer is dead or displaced, nothing it could
    still read matters), else with a FIN after what is buffered, aborted if that is not in the
    kernel within :data:`FLUSH_WAIT`."""
    if reset:
        try:
            abort_on_close(wire.get_extra_info("socket"))
        except (OSError, ValueError, AttributeError):
            pass
        wire.abort()
        return
    wire.close()
    if wire.get_write_buffer_size():
        loop.call_later(FLUSH_WAIT, wire.abort)
