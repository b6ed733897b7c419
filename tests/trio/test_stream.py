"""keepconn's own socket stream on trio: what it promises on its own, over real loopback TCP.

What a connection does above it is the server suite's business, which runs on it on trio.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import pytest
import trio
import trio.testing
from anyio.abc import SocketAttribute

from keepconn._anyio.failures import Failure, errno_of, failure_of
from keepconn._trio.listener import TrioListener
from keepconn._trio.stream import TrioStream
from tests.timing import slack

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "trio"  # this stream exists only on trio


@pytest.fixture
async def pair() -> AsyncIterator[tuple[TrioStream, socket.socket]]:
    """A TrioStream accepted by a TrioListener, and the blocking stdlib socket of its peer."""
    inner = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    listener = TrioListener(inner, inner.extra(SocketAttribute.raw_socket))
    port = listener.extra(SocketAttribute.local_port)
    peer = socket.create_connection(("127.0.0.1", port))
    stream = await listener.accept()
    assert isinstance(stream, TrioStream)
    try:
        yield stream, peer
    finally:
        peer.close()
        await stream.aclose()
        await listener.aclose()


async def test_it_is_an_anyio_socket_stream_with_anyio_s_extras(
    pair: tuple[TrioStream, socket.socket],
) -> None:
    stream, peer = pair
    assert isinstance(stream, anyio.abc.SocketStream)
    sock = stream.extra(SocketAttribute.raw_socket)
    assert type(sock) is socket.socket  # the stdlib socket, no trio wrapper around it
    assert sock.getblocking() is False
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert stream.extra(SocketAttribute.remote_address) == peer.getsockname()
    assert stream.extra(SocketAttribute.local_address) == peer.getpeername()
    assert stream.extra(SocketAttribute.family) == socket.AF_INET
    assert stream.extra(SocketAttribute.remote_port) == peer.getsockname()[1]
    assert not hasattr(stream, "__dict__") or not vars(stream)  # every field is a slot


async def test_receive_returns_what_the_peer_sent_and_end_of_stream_at_its_fin(
    pair: tuple[TrioStream, socket.socket],
) -> None:
    stream, peer = pair
    peer.sendall(b"hello")
    assert await stream.receive(100) == b"hello"
    peer.sendall(b"abcdef")
    with anyio.fail_after(slack(5)):
        assert await stream.receive(3) == b"abc"  # at most max_bytes
        assert await stream.receive() == b"def"
    peer.shutdown(socket.SHUT_WR)
    with pytest.raises(anyio.EndOfStream), anyio.fail_after(slack(5)):
        await stream.receive()
    with pytest.raises(ValueError):
        await stream.receive(0)


async def test_a_reset_is_a_broken_resource_with_its_errno(
    pair: tuple[TrioStream, socket.socket],
) -> None:
    stream, peer = pair
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # RST
    with pytest.raises(anyio.BrokenResourceError) as caught, anyio.fail_after(slack(5)):
        await stream.receive()
    assert errno_of(caught.value) == errno.ECONNRESET
    assert failure_of(caught.value) == (Failure.BROKEN, "ECONNRESET")
    with pytest.raises(anyio.BrokenResourceError) as caught:
        await stream.send(b"x")  # the kernel remembers: EPIPE
    assert failure_of(caught.value)[0] is Failure.BROKEN


async def test_a_full_send_buffer_takes_part_and_send_finishes_the_rest(
    pair: tuple[TrioStream, socket.socket],
) -> None:
    stream, peer = pair
    raw = stream.extra(SocketAttribute.raw_socket)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = bytes(range(256)) * 16384  # 4 MiB: more than the buffers hold unread
    done = trio.Event()

    async def send() -> None:
        await stream.send(payload)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        await trio.sleep(0.2)
        assert not done.is_set()  # the peer reads nothing yet: the send waits for room
        got = bytearray()
        peer.setblocking(False)
        with trio.fail_after(slack(20)):
            while len(got) < len(payload):
                await trio.lowlevel.wait_readable(peer)
                got += peer.recv(1 << 20)
            await done.wait()
    assert got == payload  # whole and in order, across many partial writes


async def test_send_eof_gives_the_peer_a_fin_and_reading_goes_on(
    pair: tuple[TrioStream, socket.socket],
) -> None:
    stream, peer = pair
    await stream.send(b"last")
    await stream.send_eof()
    assert peer.recv(10) == b"last"
    assert peer.recv(10) == b""  # FIN
    peer.sendall(b"after")
    with anyio.fail_after(slack(5)):
        assert await stream.receive() == b"after"


async def test_a_cancelled_receive_leaves_the_stream_usable(
    pair: tuple[TrioStream, socket.socket],
) -> None:
    stream, peer = pair
    with trio.move_on_after(0.05) as scope:
        await stream.receive()
    assert scope.cancelled_caught
    peer.sendall(b"still here")
    with anyio.fail_after(slack(5)):
        assert await stream.receive() == b"still here"
    # Bytes waiting or not, a receive in a cancelled scope is cancelled before it reads, so
    # nothing is lost to it.
    peer.sendall(b"kept")
    await trio.sleep(0.05)
    with trio.CancelScope() as scope:
        scope.cancel()
        await stream.receive()
    assert scope.cancelled_caught
    assert await stream.receive() == b"kept"


async def test_every_operation_is_a_checkpoint_even_when_it_need_not_wait(
    pair: tuple[TrioStream, socket.socket],
) -> None:
    stream, peer = pair
    peer.sendall(b"ready")
    await trio.sleep(0.05)
    with trio.testing.assert_checkpoints():
        assert await stream.receive() == b"ready"
    with trio.testing.assert_checkpoints():
        await stream.send(b"room")
    with trio.testing.assert_checkpoints():
        await stream.send_eof()


async def test_close_wakes_a_blocked_receive_and_later_use_is_closed_resource(
    pair: tuple[TrioStream, socket.socket],
) -> None:
    stream, _ = pair
    raw = stream.extra(SocketAttribute.raw_socket)
    seen: list[BaseException] = []

    async def reader() -> None:
        try:
            await stream.receive()
        except anyio.ClosedResourceError as exc:
            seen.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(0.05)
        with trio.fail_after(slack(5)):
            await stream.aclose()
    assert len(seen) == 1
    assert raw.fileno() == -1
    with pytest.raises(anyio.ClosedResourceError):
        await stream.receive()
    with pytest.raises(anyio.ClosedResourceError):
        await stream.send(b"x")
    with pytest.raises(anyio.ClosedResourceError):
        await stream.send_eof()
    await stream.aclose()  # twice is fine


async def test_two_readers_at_once_are_refused(
    pair: tuple[TrioStream, socket.socket],
) -> None:
    stream, peer = pair
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.receive)
        await trio.sleep(0.05)
        with pytest.raises(anyio.BusyResourceError):
            await stream.receive()
        peer.sendall(b"x")  # lets the first one finish
    # Once it is done, reading is free again.
    peer.sendall(b"y")
    with anyio.fail_after(slack(5)):
        assert await stream.receive() == b"y"


async def test_closing_the_listener_ends_a_waiting_accept() -> None:
    inner = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    listener = TrioListener(inner, inner.extra(SocketAttribute.raw_socket))
    seen: list[BaseException] = []

    async def accept() -> None:
        try:
            await listener.accept()
        except anyio.ClosedResourceError as exc:
            seen.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        await trio.sleep(0.05)
        with trio.fail_after(slack(5)):
            await listener.aclose()
    assert len(seen) == 1
    with pytest.raises(anyio.ClosedResourceError):
        await listener.accept()
