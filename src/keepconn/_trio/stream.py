"""A TCP stream over a bare socket on trio: what a server connection reads and writes.

anyio's trio stream is three objects around the socket (anyio's ``SocketStream`` with a
``__dict__`` and two ``ResourceGuard``\\ s, trio's ``SocketType`` with a ``__dict__``), and a
connection blocked in ``receive`` holds two coroutine frames more (trio's ``recv`` and its
non-blocking helper). This one is a single slotted object over the stdlib socket, waiting on
the socket's readiness itself, and it keeps what keepconn and its users rely on of anyio's:

* it is an ``anyio.abc.SocketStream`` (``isinstance`` holds; its extras are anyio's own,
  read off :attr:`_raw_socket`);
* every operation is a trio checkpoint, as trio's socket methods are: a cancel point before,
  and a schedule point after one that did not have to wait;
* the same exceptions: an OSError from the socket is ``anyio.BrokenResourceError`` (from the
  OSError, so its errno still classifies the failure), use after close is
  ``anyio.ClosedResourceError``, the peer's FIN is ``anyio.EndOfStream``, and two tasks
  reading (or writing) at once is ``anyio.BusyResourceError``.
"""

from __future__ import annotations

import socket

import anyio
import anyio.abc
import trio

__all__ = ["TrioStream"]

# Looked up once: the stream's methods run on every read and write of every connection.
_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
_cancel_shielded_checkpoint = trio.lowlevel.cancel_shielded_checkpoint
_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable


class TrioStream(anyio.abc.SocketStream):
    """An anyio socket stream on trio over a connected, non-blocking stdlib socket."""

    # anyio's base classes carry no __slots__, so instances still could have a __dict__; none
    # is ever made (every field is a slot), and subclassing keeps the public contract that a
    # connection's stream is an anyio ByteStream. Two flags stand in for anyio's resource
    # guards: a guard is an object per direction, a flag is a slot.
    __slots__ = ("_closed", "_receiving", "_sending", "_sock")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._closed = False
        self._receiving = False
        self._sending = False

    @property
    def _raw_socket(self) -> socket.socket:
        return self._sock

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if max_bytes < 1:
            raise ValueError("max_bytes must be a positive integer")
        if self._receiving:
            raise anyio.BusyResourceError("reading from")
        self._receiving = True
        try:
            await _checkpoint_if_cancelled()
            waited = False
            # The wait is inline rather than in a helper coroutine, and outside the except
            # clause: an idle connection is parked in it, and a helper's frame, or the
            # BlockingIOError and its traceback an except clause keeps alive while it awaits,
            # would be objects more for each of them.
            while True:
                if self._closed:
                    raise anyio.ClosedResourceError
                try:
                    data = self._sock.recv(max_bytes)
                    break
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise self._broken() from exc
                waited = True
                try:
                    await _wait_readable(self._sock)
                except trio.ClosedResourceError:
                    raise anyio.ClosedResourceError from None  # closed while we waited
            if not waited:
                # Bytes were there at once: still let the other tasks run, as trio does, so
                # that a peer that keeps the buffer full cannot starve them.
                await _cancel_shielded_checkpoint()
        finally:
            self._receiving = False
        if not data:
            raise anyio.EndOfStream
        return data

    async def send(self, item: bytes) -> None:
        if self._sending:
            raise anyio.BusyResourceError("writing to")
        self._sending = True
        try:
            await _checkpoint_if_cancelled()
            waited = False
            view: memoryview | None = None
            left: bytes | memoryview = item
            while True:
                if self._closed:
                    raise anyio.ClosedResourceError
                try:
                    sent = self._sock.send(left)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    raise self._broken() from exc
                if sent >= len(left):
                    break
                if sent:
                    # A full send buffer took only part: send the rest once there is room (a
                    # view, so the rest is not copied; a usual frame goes whole and makes none).
                    if view is None:
                        view = memoryview(item)
                        left = view
                    left = left[sent:]
                waited = True
                try:
                    await _wait_writable(self._sock)
                except trio.ClosedResourceError:
                    raise anyio.ClosedResourceError from None
            if not waited:
                await _cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        # A half-close: the peer reads a FIN, we go on reading (a graceful close's grace).
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise anyio.ClosedResourceError
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise self._broken() from exc

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            sock = self._sock
            if sock.fileno() >= 0:
                # A task waiting on the descriptor must be woken (ClosedResourceError) before
                # it is closed: the number is reused by the next socket opened.
                trio.lowlevel.notify_closing(sock)
                sock.close()
        await trio.lowlevel.checkpoint()

    def _broken(self) -> Exception:
        # An error on a socket this stream closed itself (a send racing our aclose) is a use
        # after close, as anyio reports it; anything else means the connection broke.
        if self._closed:
            return anyio.ClosedResourceError()
        return anyio.BrokenResourceError()

    def __repr__(self) -> str:
        return f"<TrioStream fd={self._sock.fileno()}>"
