"""A peer's FIN in the middle of the TLS handshake is answered at once, not at the hello
timeout: keepconn promises no CLOSE_WAIT, and a device that gives up on a slow handshake (a
storm) sends exactly that.

The client is OpenSSL itself (a memory-BIO ``SSLObject``) on a plain socket, so the test can
stop at any point of a real handshake and half-close: before a byte, after part of the
ClientHello, after all of it (the server then answers with its ServerHello and reads on), and
after the server's flight, without the client's Finished.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time

import anyio
import pytest

from keepconn import CloseReason, ServerConfig, ServerEvent
from tests.lineapp import closes, serving, wait_for
from tests.timing import slack
from tests.tlscerts import Pki

pytestmark = pytest.mark.anyio

#: Long enough that a FIN the server did not notice would still be in CLOSE_WAIT when checked.
HELLO_TIMEOUT = 60.0


def server_states(port: int) -> dict[str, int]:
    from keepconn.tcp import census

    counts: dict[str, int] = {}
    for row in census(port).sockets:
        if row.local_port == port:
            counts[row.state] = counts.get(row.state, 0) + 1
    return counts


def half_handshake(port: int, context: ssl.SSLContext, stop: str) -> None:
    """Connect, run the client's side of the handshake up to ``stop``, then send FIN (and keep
    the socket open, reading, so only the server can end it)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(slack(5))
    try:
        if stop == "part of the ClientHello":
            sock.sendall(hello[: len(hello) // 2])
        elif stop in ("the ClientHello", "the server's flight"):
            sock.sendall(hello)
        if stop == "the server's flight":
            # Read the server's ServerHello .. Finished until our side of the handshake is
            # done; our own Finished (now in ``outgoing``) is never sent.
            for _ in range(20):
                data = sock.recv(65536)
                assert data, "the server closed before its flight"
                incoming.write(data)
                try:
                    tls.do_handshake()
                except ssl.SSLWantReadError:
                    continue
                break
            else:
                raise AssertionError("no complete server flight in 20 reads")
        sock.shutdown(socket.SHUT_WR)
        # The server must now close its side: EOF (or a reset) comes back.
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(65536):
                pass
    finally:
        sock.close()


STOPS = ["nothing", "part of the ClientHello", "the ClientHello", "the server's flight"]


@pytest.mark.parametrize("stop", STOPS)
async def test_a_fin_during_the_handshake_closes_the_connection_at_once(
    pki: Pki, stop: str
) -> None:
    events: list[ServerEvent] = []
    config = ServerConfig(admission=None, flapping=None, hello_timeout=HELLO_TIMEOUT)
    async with serving(config, events=events, ssl_context=pki.server_context()) as (
        server,
        port,
    ):
        started = time.monotonic()
        with anyio.fail_after(slack(5)):
            await anyio.to_thread.run_sync(half_handshake, port, pki.client_context(), stop)
        await wait_for(lambda: server.stats().connections == 0, timeout=slack(5))
        assert time.monotonic() - started < slack(5) < HELLO_TIMEOUT
        [closed] = closes(events, CloseReason.PEER_CLOSED)
        # A FIN that came before the server accepted is seen at accept, before any handshake.
        assert "TLS handshake" in closed.detail or closed.detail == "gone before it was accepted"
        assert closes(events, CloseReason.HELLO_TIMEOUT) == []
        await wait_for(lambda: server_states(port).get("CLOSE_WAIT", 0) == 0, timeout=slack(2))
