"""The framers, and the framer contract: nothing a peer sent correctly is lost.

However TCP splits a byte stream, a framer fed the pieces must yield the same frames in the
same order, and bad bytes after good frames must raise only after those frames were handed
over (with the error, as its ``frames``). ``collect`` below does what the connection does.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keepconn import ConfigError, Framer, LengthPrefixedFramer, LineFramer, ProtocolError


def collect(framer: Framer[bytes], chunks: Iterable[bytes]) -> tuple[list[bytes], str | None]:
    """Feed ``chunks`` as the connection does; the frames delivered, and the error if any."""
    frames: list[bytes] = []
    for chunk in chunks:
        try:
            frames.extend(framer.feed(chunk))
        except ProtocolError as exc:
            frames.extend(exc.frames)
            return frames, str(exc)
    return frames, None


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


lines = st.lists(st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")), max_size=8)


@given(good=lines, cuts=st.lists(st.integers(min_value=0), max_size=10), crlf=st.booleans())
def test_line_framer_yields_the_same_frames_however_the_stream_is_split(
    good: list[bytes], cuts: list[int], crlf: bool
) -> None:
    ending = b"\r\n" if crlf else b"\n"
    data = b"".join(line + ending for line in good)
    frames, error = collect(LineFramer(max_length=24), split(data, cuts))
    # A line that itself ends in "\r" loses it under "\n" framing, as documented.
    expected = good if crlf else [line.removesuffix(b"\r") for line in good]
    assert (frames, error) == (expected, None)


@given(good=lines, cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_line_framer_hands_over_every_good_line_before_an_overlong_one(
    good: list[bytes], cuts: list[int]
) -> None:
    good = [line.replace(b"\r", b"") for line in good]
    data = b"".join(line + b"\n" for line in good) + b"x" * 40 + b"\nafter\n"
    frames, error = collect(LineFramer(max_length=24), split(data, cuts))
    assert frames == good
    assert error == "line longer than 24 bytes"


def test_line_framer_in_one_write_two_good_lines_then_a_bad_one() -> None:
    framer = LineFramer(max_length=8)
    with pytest.raises(ProtocolError, match="longer than 8") as caught:
        framer.feed(b"one\r\ntwo\n" + b"x" * 9 + b"\n")
    assert caught.value.frames == (b"one", b"two")


def test_line_framer_limit_counts_the_line_without_its_terminator() -> None:
    framer = LineFramer(max_length=3)
    assert framer.feed(b"abc\r\nabc\n") == [b"abc", b"abc"]
    with pytest.raises(ProtocolError):
        framer.feed(b"abcd\n")


def test_line_framer_refuses_an_endless_line_before_it_ends() -> None:
    framer = LineFramer(max_length=3)
    assert framer.feed(b"abc") == []
    assert framer.feed(b"\r") == []  # still room for the terminator
    with pytest.raises(ProtocolError) as caught:
        framer.feed(b"d")
    assert caught.value.frames == ()


bodies = st.lists(st.binary(max_size=30), max_size=8)


@given(good=bodies, cuts=st.lists(st.integers(min_value=0), max_size=10), bad=st.booleans())
def test_length_prefixed_framer_yields_the_same_frames_however_the_stream_is_split(
    good: list[bytes], cuts: list[int], bad: bool
) -> None:
    data = b"".join(LengthPrefixedFramer.encode(body) for body in good)
    if bad:
        data += (1 << 20).to_bytes(4, "big") + b"ignored"
    frames, error = collect(LengthPrefixedFramer(max_length=64), split(data, cuts))
    assert frames == good
    assert error == (f"declared frame length {1 << 20} exceeds 64" if bad else None)


def test_framers_validate_their_limit() -> None:
    for framer in (LineFramer, LengthPrefixedFramer):
        with pytest.raises(ConfigError, match="max_length"):
            framer(max_length=0)
