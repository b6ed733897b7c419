"""What keepconn does to asyncio's own transports when it is done with them."""

from __future__ import annotations

import asyncio

__all__ = ["break_transport_cycle"]


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
