"""Load shedding at accept, on a real server: connections that waited in the listen queue while
the loop was held are refused at accept (OVERLOADED, limit ``accept_delay`` or ``loop_lag``)
before any handshake, one whose client gave up meanwhile is closed without one, the live
session is untouched, and a device that comes once the server keeps up gets its session.

The loop is held the way a storm holds it, by work on the loop itself (here a blocking sleep in
the test's own task); the kernel completes the devices' TCP handshakes meanwhile, as it does
for a listen queue in a storm.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time

import anyio
import pytest

from keepconn import AdmissionConfig, CloseReason, ServerConfig, ServerEvent
from tests.lineapp import Client, closes, serving, wait_for
from tests.timing import slack
from tests.tlscerts import Pki

pytestmark = pytest.mark.anyio

#: Devices that connect while the loop is held.
QUEUED = 3


def client_hello(context: ssl.SSLContext) -> bytes:
    """The bytes a real TLS client sends first (its ClientHello), from OpenSSL itself."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def answer(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sent before it closed (b"" if nothing), reset or not."""
    sock.settimeout(timeout)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    return got


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "tcp"])
async def test_connections_queued_while_the_loop_lags_are_refused_before_any_handshake(
    pki: Pki, tls: bool
) -> None:
    limit = slack(0.3)
    admission = AdmissionConfig(
        accept_rate=None,
        max_pending_hellos=None,
        max_loop_lag=limit,
        lag_probe_interval=limit / 4,
        max_accept_delay=None,
    )
    events: list[ServerEvent] = []
    server_context = pki.server_context() if tls else None
    client_context = pki.client_context() if tls else None
    async with serving(
        ServerConfig(admission=admission, flapping=None), events=events, ssl_context=server_context
    ) as (server, port):
        live = await Client.connect(port, tls=client_context)
        assert await live.hello("live") == b"OK"
        queued = [socket.create_connection(("127.0.0.1", port)) for _ in range(QUEUED)]
        try:
            for sock in queued:
                if client_context is not None:
                    sock.sendall(client_hello(client_context))
            # Hold the event loop for three times the limit: the kernel has completed the
            # devices' connections, the server cannot accept them until the loop is free.
            time.sleep(3 * limit)  # noqa: ASYNC251 (blocking the loop is the point)
            await wait_for(lambda: len(closes(events, CloseReason.OVERLOADED)) == QUEUED)
            for sock in queued:
                got = await anyio.to_thread.run_sync(answer, sock, slack(5))
                # Under TLS not one byte back (no ServerHello: no handshake was done); on
                # plain TCP only the refuse callback's retry hint, about as long as the lag.
                if tls:
                    assert got == b""
                else:
                    assert got.startswith(b"RETRY ")
                    assert float(got.split()[1]) >= 0.9 * 2 * limit
        finally:
            for sock in queued:
                sock.close()
        stats = server.stats()
        assert stats.admission is not None
        assert stats.admission.refused["loop_lag"] == QUEUED
        assert stats.admission.total_refused == QUEUED
        # The probe measured the stall it slept through, less at most one probe interval.
        assert stats.admission.loop_lag_peak >= 3 * limit - limit / 4
        assert {e.detail for e in closes(events, CloseReason.OVERLOADED)} == {"loop_lag"}
        # Once the loop is on time again a device connects at once, and the live session
        # never noticed.
        await wait_for(lambda: server.stats().admission.loop_lag <= limit)  # type: ignore[union-attr]
        late = await Client.connect(port, tls=client_context)
        assert await late.hello("late") == b"OK"
        await live.send(b"DATA 1")
        assert await live.line() == b"ACK 1"
        assert server.stats().admission.refused["loop_lag"] == QUEUED  # type: ignore[union-attr]
        await late.aclose()
        await live.aclose()


async def test_the_default_admission_refuses_nothing_for_lag_in_ordinary_operation(
    pki: Pki,
) -> None:
    """Defaults on (the lag probe runs): a few sessions come and go, none is refused."""
    events: list[ServerEvent] = []
    async with serving(
        ServerConfig(flapping=None), events=events, ssl_context=pki.server_context()
    ) as (server, port):
        for n in range(20):
            client = await Client.connect(port, tls=pki.client_context())
            assert await client.hello(f"d{n}") == b"OK"
            await client.aclose()
        stats = server.stats()
        assert stats.admission is not None
        assert stats.admission.total_refused == 0
        assert stats.admission.loop_lag_peak < 1.0
        assert closes(events, CloseReason.OVERLOADED) == []


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "tcp"])
async def test_connections_stale_in_the_listen_queue_are_refused_and_gone_ones_closed(
    pki: Pki, tls: bool
) -> None:
    limit = slack(0.3)
    admission = AdmissionConfig(
        accept_rate=None, max_pending_hellos=None, max_loop_lag=None, max_accept_delay=limit
    )
    events: list[ServerEvent] = []
    server_context = pki.server_context() if tls else None
    client_context = pki.client_context() if tls else None
    async with serving(
        ServerConfig(admission=admission, flapping=None), events=events, ssl_context=server_context
    ) as (server, port):
        live = await Client.connect(port, tls=client_context)
        assert await live.hello("live") == b"OK"
        queued = [socket.create_connection(("127.0.0.1", port)) for _ in range(QUEUED)]
        gave_up = socket.create_connection(("127.0.0.1", port))
        try:
            for sock in [*queued, gave_up]:
                if client_context is not None:
                    sock.sendall(client_hello(client_context))
            gave_up.close()  # its device's connect timeout: a FIN while it waits in the queue
            time.sleep(3 * limit)  # noqa: ASYNC251 (the server is behind: nobody accepts)
            await wait_for(lambda: server.stats().connections == 1)
            for sock in queued:
                got = await anyio.to_thread.run_sync(answer, sock, slack(5))
                if tls:
                    assert got == b""
                else:
                    assert got.startswith(b"RETRY ")
                    assert float(got.split()[1]) >= 0.9 * 3 * limit
        finally:
            for sock in queued:
                sock.close()
        # The one that gave up was queued last, so it may be accepted after the others were
        # answered: wait for its close rather than assume it came first.
        await wait_for(lambda: len(closes(events, CloseReason.PEER_CLOSED)) == 1, slack(5))
        refused = closes(events, CloseReason.OVERLOADED)
        assert {e.detail for e in refused} == {"accept_delay"} and len(refused) == QUEUED
        [gone] = closes(events, CloseReason.PEER_CLOSED)
        assert gone.detail == "gone before it was accepted"
        stats = server.stats()
        assert stats.admission is not None and stats.admission.refused["accept_delay"] == QUEUED
        assert stats.pending_hellos == 0
        # A device that connects now waits for nothing and gets its session; the live one
        # never noticed.
        fresh = await Client.connect(port, tls=client_context)
        assert await fresh.hello("fresh") == b"OK"
        await live.send(b"DATA 2")
        assert await live.line() == b"ACK 2"
        await fresh.aclose()
        await live.aclose()
