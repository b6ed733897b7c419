"""Framers: turn a byte stream into complete frames, sans-I/O.

The server touches a session once per *complete* frame, so it needs to know where frames end.
The application supplies a framer (anything with ``feed(data) -> list of frames`` that raises
:class:`~keepconn.ProtocolError` on malformed input); two common ones are provided. A trickle of
partial frames never counts as life, which is what defeats slowloris-style peers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from .errors import ProtocolError
from .validate import check_number

__all__ = ["Framer", "LengthPrefixedFramer", "LineFramer"]

F_co = TypeVar("F_co", covariant=True)


class Framer(Protocol[F_co]):
    """Splits inbound bytes into frames. Keeps partial input between calls."""

    def feed(self, data: bytes) -> Sequence[F_co]:
        """Add ``data``; return the frames it completed (possibly none).

        Raises ProtocolError (or a subclass) when the input can never become a valid frame.
        """
        ...


class LineFramer:
    """Newline-terminated frames (``\\n``; a preceding ``\\r`` is stripped), at most
    ``max_length`` bytes each, so a peer cannot make the server buffer without bound."""

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
        if buffer.find(b"\n", start) < 0:
            if len(buffer) > self._max:
                raise ProtocolError(f"line longer than {self._max} bytes")
            return []
        *lines, rest = buffer.split(b"\n")
        self._buffer = bytearray(rest)
        if len(rest) > self._max or any(len(line) > self._max + 1 for line in lines):
            raise ProtocolError(f"line longer than {self._max} bytes")
        return [bytes(line[:-1]) if line.endswith(b"\r") else bytes(line) for line in lines]


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
                raise ProtocolError(f"declared frame length {length} exceeds {self._max}")
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
