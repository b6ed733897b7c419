"""An in-process TCP forwarder on loopback whose path can be cut while it runs.

It sits between a client and a server (a gateway node and its Redis, say) and either forwards
bytes both ways (``pass``), holds every connection open while forwarding nothing (``blackhole``:
no FIN, no RST, a stalled path as a dead router makes it), or resets every connection
(``reset``: a RST for each one, open or new). The mode can change at any time from any thread;
``blackhole`` back to ``pass`` resumes every held connection where it stopped, the way TCP
recovers once a partition heals, because nothing read is ever thrown away.

It runs on a thread of its own with plain non-blocking sockets and a selector, so the same
object serves asyncio, uvloop and trio code (and synchronous code, and a server that runs in
another process), and never competes with the code under test for its event loop.
"""

from __future__ import annotations

import enum
import errno
import selectors
import socket
import struct
import threading
from types import TracebackType

import anyio.to_thread

__all__ = ["ForwarderMode", "TcpForwarder"]

#: Bytes buffered towards one side before the forwarder stops reading the other: a slow reader
#: slows its writer down instead of growing the forwarder's memory.
_HIGH_WATER = 256 * 1024
_CHUNK = 65536


class ForwarderMode(str, enum.Enum):
    """What a :class:`TcpForwarder` does with its connections."""

    #: Forward bytes both ways, and EOFs and resets as they come.
    PASS = "pass"
    #: Accept and hold every connection, forward nothing, send neither FIN nor RST.
    BLACKHOLE = "blackhole"
    #: Reset every connection (SO_LINGER 0), the open ones and each new one at once.
    RESET = "reset"


def _reset(sock: socket.socket) -> None:
    """Close with a RST: SO_LINGER on with a zero timeout makes close() abort the connection."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # already broken: close() below is all that is left
    sock.close()


class _Half:
    """One direction of a connection: bytes read from ``src`` waiting to be written to ``dst``."""

    __slots__ = ("buffer", "eof", "shut")

    def __init__(self) -> None:
        self.buffer = bytearray()
        #: The source sent FIN: once the buffer is written, the destination gets one too.
        self.eof = False
        self.shut = False


class _Pair:
    """A client connection and the forwarder's own connection to the server."""

    __slots__ = ("client", "server", "connected", "up", "down")

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.server: socket.socket | None = None
        self.connected = False
        self.up = _Half()  # client -> server
        self.down = _Half()  # server -> client

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.client, self.server) if s is not None]


class TcpForwarder:
    """Forward ``listen_host:port`` (a free loopback port by default) to ``target``.

    Use it as a context manager, plain or async (``with`` / ``async with``), or call
    :meth:`start` and :meth:`close`. Point the client at :attr:`port`, then set :attr:`mode`
    whenever the path should change. Counters: :attr:`accepted` connections since start and
    :attr:`open_connections` now.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        mode: ForwarderMode | str = ForwarderMode.PASS,
    ) -> None:
        self.target = (target_host, target_port)
        self._listen = (listen_host, listen_port)
        self._mode = ForwarderMode(mode)
        self._lock = threading.Lock()
        self._pending_modes: list[ForwarderMode] = []
        self._pairs: dict[socket.socket, _Pair] = {}
        self._selector: selectors.DefaultSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: Connections accepted since :meth:`start`.
        self.accepted = 0
        #: The port clients connect to (known once started).
        self.port = 0

    # -- the caller's side (any thread)

    @property
    def mode(self) -> ForwarderMode:
        """The current mode; setting it takes effect on the forwarder's thread at once."""
        return self._mode

    @mode.setter
    def mode(self, value: ForwarderMode | str) -> None:
        new = ForwarderMode(value)
        with self._lock:
            self._mode = new
            # Every change is applied in order: a RESET then PASS still resets what was open.
            self._pending_modes.append(new)
        self._wake()

    @property
    def open_connections(self) -> int:
        """Client connections the forwarder holds now."""
        with self._lock:
            return len({id(p) for p in self._pairs.values()})

    def start(self) -> TcpForwarder:
        """Bind, listen and start forwarding; returns self."""
        if self._thread is not None:
            raise RuntimeError("TcpForwarder.start() called twice")
        listener = socket.create_server(self._listen, backlog=1024)
        listener.setblocking(False)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(
            target=self._run, name=f"keepconn-forwarder-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop: close the listener and every connection (a FIN each) and join the thread."""
        thread = self._thread
        if thread is None or self._stopping:
            return
        self._stopping = True
        self._wake()
        thread.join(10)
        if thread.is_alive():  # pragma: no cover - the loop never blocks for long
            raise RuntimeError("the forwarder's thread did not stop within 10 s")

    def __enter__(self) -> TcpForwarder:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> TcpForwarder:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Joining the thread blocks for up to one selector round: not on the event loop.
        await anyio.to_thread.run_sync(self.close)

    def _wake(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass  # the buffer is full: the thread is already due to wake

    # -- the forwarder's thread

    def _run(self) -> None:
        assert self._selector is not None
        try:
            while not self._stopping:
                for key, events in self._selector.select(1.0):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._listener:
                        self._accept()
                    elif sock is self._wake_r:
                        self._drain_wake()
                    else:
                        pair = self._pairs.get(sock)
                        if pair is not None:
                            self._service(pair, sock, events)
        finally:
            self._shutdown()

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            modes, self._pending_modes = self._pending_modes, []
        if ForwarderMode.RESET in modes:
            for pair in self._each_pair():
                self._drop(pair, abort=True)
        if modes:
            for pair in self._each_pair():
                self._update(pair)

    def _each_pair(self) -> list[_Pair]:
        with self._lock:
            return list({id(p): p for p in self._pairs.values()}.values())

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):  # a bounded batch: mode changes are not starved by a flood
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE, ECONNABORTED: the next round tries again
            self.accepted += 1
            if self._mode is ForwarderMode.RESET:
                _reset(client)
                continue
            client.setblocking(False)
            pair = _Pair(client)
            with self._lock:
                self._pairs[client] = pair
            if self._mode is ForwarderMode.PASS:
                self._connect(pair)
            self._update(pair)

    def _connect(self, pair: _Pair) -> None:
        server = socket.socket(socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET)
        server.setblocking(False)
        pair.server = server
        with self._lock:
            self._pairs[server] = pair
        code = server.connect_ex(self.target)
        if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self._drop(pair, abort=True)  # refused at once: the client sees a reset, as it would

    def _service(self, pair: _Pair, sock: socket.socket, events: int) -> None:
        try:
            if sock is pair.server and not pair.connected:
                if events & selectors.EVENT_WRITE:
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        self._drop(pair, abort=True)
                        return
                    pair.connected = True
            elif self._mode is ForwarderMode.PASS:
                src_half, dst_half = (
                    (pair.up, pair.down)
                    if sock is pair.client
                    else (
                        pair.down,
                        pair.up,
                    )
                )
                if events & selectors.EVENT_READ:
                    self._read(sock, src_half)
                if events & selectors.EVENT_WRITE:
                    self._write(sock, dst_half)
        except OSError:
            # ECONNRESET and kin: the other side learns of it the same way.
            self._drop(pair, abort=True)
            return
        if (pair.up.shut and pair.down.shut) or pair.client.fileno() < 0:
            self._drop(pair, abort=False)
            return
        self._update(pair)

    @staticmethod
    def _read(sock: socket.socket, half: _Half) -> None:
        try:
            data = sock.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        if data:
            half.buffer += data
        else:
            half.eof = True

    def _write(self, sock: socket.socket, half: _Half) -> None:
        if half.buffer:
            try:
                sent = sock.send(half.buffer)
            except (BlockingIOError, InterruptedError):
                return
            del half.buffer[:sent]
        if half.eof and not half.buffer and not half.shut:
            sock.shutdown(socket.SHUT_WR)
            half.shut = True

    def _update(self, pair: _Pair) -> None:
        """Register each socket for what it should wait on in the current mode."""
        assert self._selector is not None
        passing = self._mode is ForwarderMode.PASS
        if passing and pair.server is None:
            self._connect(pair)  # accepted while blackholed: reach the server now
            if pair.server is None or pair.client.fileno() < 0:
                return
        for sock in pair.sockets():
            wanted = 0
            if sock is pair.server and not pair.connected:
                wanted = selectors.EVENT_WRITE
            elif passing and pair.connected:
                inbound, outbound = (
                    (pair.up, pair.down) if sock is pair.client else (pair.down, pair.up)
                )
                if not inbound.eof and len(inbound.buffer) < _HIGH_WATER:
                    wanted |= selectors.EVENT_READ
                if outbound.buffer or (outbound.eof and not outbound.shut):
                    wanted |= selectors.EVENT_WRITE
            self._interest(sock, wanted)

    def _interest(self, sock: socket.socket, events: int) -> None:
        assert self._selector is not None
        try:
            registered = self._selector.get_key(sock).events
        except KeyError:
            registered = 0
        if events == registered:
            return
        if not events:
            self._selector.unregister(sock)
        elif not registered:
            self._selector.register(sock, events)
        else:
            self._selector.modify(sock, events)

    def _drop(self, pair: _Pair, *, abort: bool) -> None:
        assert self._selector is not None
        for sock in pair.sockets():
            with self._lock:
                self._pairs.pop(sock, None)
            if sock.fileno() >= 0:
                try:
                    self._selector.unregister(sock)
                except (KeyError, ValueError):
                    pass
                if abort:
                    _reset(sock)
                else:
                    sock.close()

    def _shutdown(self) -> None:
        for pair in self._each_pair():
            self._drop(pair, abort=False)
        assert self._selector is not None
        self._selector.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
