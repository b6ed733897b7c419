"""Framers: turn a byte stream into complete frames, sans-I/O.

The server touches a session once per *complete* frame, so it needs to know where frames end.
The application supplies a framer; two common ones are provided. A trickle of partial frames
never counts as life, which is what defeats slowloris-style peers.

The contract (what a framer of your own must do):

* ``feed(data)`` adds ``data`` to what the framer holds and returns the frames it completed, in
  order: a list, or any iterable (a generator works too).
* Bytes that can never become a valid frame raise :class:`~keepconn.ProtocolError` (or a
  subclass). **Nothing a peer sent correctly may be lost with it**: when good frames precede
  the bad bytes in the same ``data``, pass them along, ``raise ProtocolError(msg,
  frames=good)``; a generator may instead simply yield them before it raises. The connection
  hands those frames to the application first and raises the error after them, so what reaches
  the handler does not depend on how TCP split the bytes.
* After raising, the framer is finished: the connection never feeds it again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

from .errors import ProtocolError
from .validate import check_number

__all__ = ["Framer", "LengthPrefixedFramer", "LineFramer"]

F_co = TypeVar("F_co", covariant=True)


class Framer(Protocol[F_co]):
    """Splits inbound bytes into frames. Keeps partial input between calls."""

    def feed(self, data: bytes) -> Iterable[F_co]:
        """Add ``data``; return the frames it completed (possibly none), in order.

        Raises ProtocolError (or a subclass) when the input can never become a valid frame,
        with the frames completed before the bad bytes as its ``frames``.
        """
        ...


class LineFramer:
    """Newline-terminated frames (``\\n``; a preceding ``\\r`` is stripped), at most
    ``max_length`` bytes each, so a peer cannot make the server buffer without bound.

    :param max_length: the longest line, in bytes, a whole number in (0, inf).
    :raises keepconn.ConfigError: ``max_length`` is out of range.

    :meth:`feed` raises :class:`~keepconn.ProtocolError` for a longer line, carrying the lines
    completed before it in the same input:

    >>> framer = LineFramer(max_length=8)
    >>> framer.feed(b"PING\\r\\nhel")
    [b'PING']
    >>> framer.feed(b"lo\\n")
    [b'hello']
    >>> try:
    ...     framer.feed(b"ok\\n" + b"x" * 20)
    ... except ProtocolError as exc:
    ...     print(exc, exc.frames)
    line longer than 8 bytes (b'ok',)
    """

    __slots__ = ("_buffer", "_max")

    def __init__(self, max_length: int = 65536) -> None:
        check_number("max_length", max_length, integer=True)
        self._buffer = bytearray()
        self._max = max_length

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data`` and return the complete lines, without their terminators."""
        buffer = self._buffer
        start = len(buffer)
        buffer += data
        limit = self._max
        if buffer.find(b"\n", start) < 0:
            # Room for a "\r" that may still come before the "\n".
            if len(buffer) > limit + 1:
                raise ProtocolError(f"line longer than {limit} bytes")
            return []
        *lines, rest = buffer.split(b"\n")
        self._buffer = bytearray(rest)
        frames: list[bytes] = []
        for line in lines:
            frame = bytes(line[:-1]) if line.endswith(b"\r") else bytes(line)
            if len(frame) > limit:
                raise ProtocolError(f"line longer than {limit} bytes", frames=frames)
            frames.append(frame)
        if len(rest) > limit + 1:
            raise ProtocolError(f"line longer than {limit} bytes", frames=frames)
        return frames


class LengthPrefixedFramer:
    """Frames preceded by a 4-byte big-endian length. A declared length above ``max_length``
    is rejected as soon as the prefix is read, before anything is allocated for the body."""

    __slots__ = ("_buffer", "_max")

    def __init__(self, max_length: int = 1 << 20) -> None:
        check_number("max_length", max_length, integer=True)
        self._buffer = bytearray()
        self._max = max_length

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data`` and return the complete frame bodies."""
        buffer = self._buffer
        buffer += data
        frames: list[bytes] = []
        offset = 0
        while len(buffer) - offset >= 4:
            length = int.from_bytes(buffer[offset : offset + 4], "big")
            if length > self._max:
                raise ProtocolError(
                    f"declared frame length {length} exceeds {self._max}", frames=frames
                )
            end = offset + 4 + length
            if len(buffer) < end:
                break
            frames.append(bytes(buffer[offset + 4 : end]))
            offset = end
        if offset:
            del buffer[:offset]
        return frames

    @staticmethod
    def encode(body: bytes) -> bytes:
        """Frame ``body`` for sending."""
        return len(body).to_bytes(4, "big") + body
