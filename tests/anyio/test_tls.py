"""keepconn.Server over TLS, on asyncio, uvloop and trio, with the line protocol of lineapp.

Everything the server does on plain TCP must hold under TLS, where the bytes in the kernel are
ciphertext and a close could wait on close_notify: keepalive on the TCP socket, the RST of a
dead peer's close, takeovers, sparing, the audit, the graceful shutdown. And TLS adds its own
failures, which must close only the connection that failed: plaintext on the TLS port, refused
client certificates, peers that connect and never finish the handshake.
"""

from __future__ import annotations

import errno
import ssl
import time
from typing import Any

import anyio
import pytest

from keepconn import (
    AdmissionConfig,
    CloseReason,
    ConfigError,
    Connection,
    Hello,
    HelloRejected,
    LineFramer,
    Server,
    ServerConfig,
    ServerEvent,
    SessionTakenOver,
)
from keepconn.tcp import TcpKeepalive, census
from tests.lineapp import Client, closes, goodbye, identify, serving, wait_for
from tests.timing import not_before, slack
from tests.tlscerts import Pki

pytestmark = pytest.mark.anyio

BASE: dict[str, Any] = dict(admission=None, flapping=None)


def common_name(cert: dict[str, Any] | None) -> str | None:
    """The subject's CN of a certificate as ``getpeercert()`` decodes it."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


async def identify_by_certificate(conn: Connection[bytes]) -> Hello:
    """The identity is the client certificate's CN; the HELLO line only has to be there."""
    name = common_name(conn.peer_certificate)
    line = await conn.receive()
    if name is None or not line.startswith(b"HELLO "):
        await conn.send(b"DENIED\n")
        raise HelloRejected("no client certificate")
    return Hello(name, welcome=b"OK\n")


def was_reset(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is ECONNRESET: the server sent a RST."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno == errno.ECONNRESET:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def server_side(port: int) -> dict[str, int]:
    """The states of the server's own sockets on ``port``."""
    counts: dict[str, int] = {}
    for row in census(port).sockets:
        # The server listens on 127.0.0.1: a socket on the same port number at another
        # address (a benchmark's devices on 127.0.1.x) is another process's.
        if row.local_port == port and row.local_address == "127.0.0.1":
            counts[row.state] = counts.get(row.state, 0) + 1
    return counts


async def test_a_tls_session_has_its_certificate_keepalive_and_audit(pki: Pki) -> None:
    events: list[ServerEvent] = []
    keepalive = TcpKeepalive(idle=7, interval=3, count=4)
    config = ServerConfig(keepalive=keepalive, **BASE)
    context = pki.server_context(clients="required")
    async with serving(
        config, events=events, ssl_context=context, identify=identify_by_certificate
    ) as (server, port):
        client = await Client.connect(port, tls=pki.client_context(pki.alice))
        await client.send(b"HELLO whoever x")
        assert await client.line() == b"OK"
        await client.send(b"DATA 1")
        assert await client.line() == b"ACK 1"
        [conn] = server.connections
        assert conn.identity == "alice"
        assert conn.tls_version == "TLSv1.3"
        assert common_name(conn.peer_certificate) == "alice"
        # The options are on the TCP socket beneath TLS, where the kernel needs them.
        reading = TcpKeepalive.read(conn.raw_socket())
        assert (reading.enabled, reading.idle, reading.interval, reading.count) == (True, 7, 3, 4)
        assert reading.user_timeout == keepalive.user_timeout_ms
        # The audit knows TLS connections by their TCP socket's inode: the session, and a peer
        # still in its handshake (connected, silent), are both accounted for.
        stalled = await anyio.connect_tcp("127.0.0.1", port)
        await wait_for(lambda: server.stats().pending_hellos == 1)
        audit = await server.audit()
        assert (audit.with_session, audit.in_hello, audit.phantoms) == (1, 1, 0), audit
        await stalled.aclose()
        await client.aclose()


async def test_plaintext_on_the_tls_port_is_closed_at_once_and_the_live_session_stays(
    pki: Pki,
) -> None:
    events: list[ServerEvent] = []
    async with serving(ServerConfig(**BASE), events=events, ssl_context=pki.server_context()) as (
        server,
        port,
    ):
        live = await Client.connect(port, tls=pki.client_context())
        assert await live.hello("device") == b"OK"
        plain = await Client.connect(port)
        started = time.monotonic()
        await plain.send(b"HELLO device secret")  # the live device's own credentials
        assert await plain.closed_by_server(timeout=slack(2))
        assert time.monotonic() - started < slack(0.5)
        await wait_for(lambda: bool(closes(events, CloseReason.TLS_FAILED)))
        [failed] = closes(events, CloseReason.TLS_FAILED)
        assert failed.identity is None
        assert failed.detail.startswith("TLS handshake failed: "), failed.detail
        await live.send(b"DATA 2")
        assert await live.line() == b"ACK 2"
        assert server.stats().takeovers == 0
        await plain.aclose()
        await live.aclose()


async def test_refused_client_certificates_close_only_their_connection(pki: Pki) -> None:
    events: list[ServerEvent] = []
    context = pki.server_context(clients="required")
    async with serving(
        ServerConfig(**BASE), events=events, ssl_context=context, identify=identify_by_certificate
    ) as (server, port):
        live = await Client.connect(port, tls=pki.client_context(pki.alice))
        await live.send(b"HELLO alice x")
        assert await live.line() == b"OK"
        # No certificate, one from a CA the server does not trust, an expired one: each for
        # the identity that is live. TLS 1.3 clients finish their side of the handshake before
        # the server has checked their certificate, so the refusal may come at the first read.
        for pair in (None, pki.rogue_alice, pki.expired_alice):
            try:
                intruder = await Client.connect(port, tls=pki.client_context(pair))
                await intruder.send(b"HELLO alice x")
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError)):
                    await intruder.line()
                await intruder.aclose()
            except (anyio.BrokenResourceError, ssl.SSLError, OSError):
                pass
        await wait_for(lambda: len(closes(events, CloseReason.TLS_FAILED)) == 3)
        details = [closed.detail for closed in closes(events, CloseReason.TLS_FAILED)]
        assert all("certificate" in detail.lower() for detail in details), details
        assert any("expired" in detail for detail in details), details
        await live.send(b"DATA still")
        assert await live.line() == b"ACK still"
        assert server.stats().takeovers == 0
        assert [c.identity for c in server.connections] == ["alice"]
        await live.aclose()


async def test_2000_stalled_handshakes_are_shed_or_time_out_while_a_device_gets_in(
    pki: Pki,
) -> None:
    # TCP connects that never send a ClientHello, twice as many as the pending-hello cap: the
    # oldest are shed to make room, the rest are closed at the hello timeout (each measured
    # from its own accept), and a real device gets in at once all the same.
    events: list[ServerEvent] = []
    hello_timeout, cap, stalled = 2.0, 1000, 2000
    config = ServerConfig(
        hello_timeout=hello_timeout,
        admission=AdmissionConfig(max_pending_hellos=cap, accept_rate=None),
        flapping=None,
    )
    async with serving(config, events=events, ssl_context=pki.server_context()) as (server, port):
        silent = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(stalled)]
        await wait_for(lambda: server.stats().accepted == stalled, timeout=slack(5))
        started = time.monotonic()
        device = await Client.connect(port, tls=pki.client_context())
        assert await device.hello("real") == b"OK"
        assert time.monotonic() - started < slack(0.5)

        def ended() -> int:
            return len(closes(events, CloseReason.OVERLOADED) + closes(events, timed_out_reason))

        timed_out_reason = CloseReason.HELLO_TIMEOUT
        # Each close is counted once its socket is closed, a moment after its hello ended.
        await wait_for(lambda: ended() == stalled, timeout=hello_timeout + slack(5))
        shed = closes(events, CloseReason.OVERLOADED)
        timed_out = closes(events, CloseReason.HELLO_TIMEOUT)
        assert shed and timed_out, (len(shed), len(timed_out))
        assert all(c.detail == "shed: oldest pending hello" for c in shed)
        assert all(c.detail == "in the TLS handshake" for c in timed_out)
        # Never early (the server's own clock, from accept to close), at most a little late.
        assert min(c.duration for c in timed_out) >= hello_timeout
        assert max(c.duration for c in timed_out) <= hello_timeout + slack(0.5)
        await device.send(b"DATA 1")
        assert await device.line() == b"ACK 1"
        assert server.stats().pending_hellos == 0
        for stream in silent:
            await stream.aclose()
        await device.aclose()


async def test_a_silent_tls_peer_is_reaped_with_a_rst_and_nothing_lingers(pki: Pki) -> None:
    events: list[ServerEvent] = []
    timeout, resolution = 0.5, 0.05
    config = ServerConfig(idle_timeout=30, resolution=resolution, **BASE)
    async with serving(config, events=events, ssl_context=pki.server_context()) as (server, port):
        client = await Client.connect(port, tls=pki.client_context(), strict=True)
        last = time.monotonic()  # the server's last frame from us comes after this
        assert await client.hello("silent", timeout=timeout) == b"OK"
        # Strict TLS: a close_notify would end the stream cleanly, a FIN without one would be
        # an SSL EOF error; a RST, and nothing before it, is what a dead peer's close must be.
        with pytest.raises(anyio.BrokenResourceError) as ended:
            await client.line(timeout=slack(3))
        waited = time.monotonic() - last
        assert was_reset(ended.value), repr(ended.value.__cause__)
        assert not_before(timeout) <= waited <= timeout + resolution + slack(0.3), waited
        await wait_for(lambda: bool(closes(events, CloseReason.IDLE_TIMEOUT)))
        assert server_side(port) == {"LISTEN": 1}  # no FIN_WAIT1, no ESTABLISHED left
        await anyio.aclose_forcefully(client.stream)  # strict TLS would say close_notify


async def test_takeover_under_tls_resets_the_old_connection(pki: Pki) -> None:
    events: list[ServerEvent] = []
    async with serving(ServerConfig(**BASE), events=events, ssl_context=pki.server_context()) as (
        server,
        port,
    ):
        old = await Client.connect(port, tls=pki.client_context())
        assert await old.hello("rebooted") == b"OK"
        new = await Client.connect(port, tls=pki.client_context())
        started = time.monotonic()
        assert await new.hello("rebooted") == b"OK"
        with pytest.raises(anyio.BrokenResourceError) as ended:
            await old.line(timeout=slack(2))
        assert was_reset(ended.value)
        assert time.monotonic() - started < slack(0.5)
        assert [e for e in events if isinstance(e, SessionTakenOver)]
        assert server.stats().takeovers == 1
        await new.send(b"DATA after")
        assert await new.line() == b"ACK after"
        await old.aclose()
        await new.aclose()


async def test_unread_ciphertext_spares_a_due_tls_session(pki: Pki) -> None:
    # As on plain TCP: the handler is busy, the peer's pings wait unread in the kernel (now as
    # TLS records), so the session looks silent but the peer is alive.
    events: list[ServerEvent] = []

    async def busy(conn: Connection[bytes]) -> None:
        async for line in conn:
            if line == b"WORK":
                await anyio.sleep(1.2)  # far past the 0.4 s timeout
            await conn.send(b"ACK " + line + b"\n")

    server = Server(
        identify=identify,
        handler=busy,
        framer=lambda: LineFramer(max_length=1024),
        config=ServerConfig(idle_timeout=0.4, resolution=0.05, **BASE),
        goodbye=goodbye,
        on_event=events.append,
    )
    async with anyio.create_task_group() as tasks:
        [(_, port)] = await tasks.start(
            lambda task_status: server.serve_tcp(
                "127.0.0.1", 0, ssl_context=pki.server_context(), task_status=task_status
            )
        )
        client = await Client.connect(port, tls=pki.client_context())
        assert await client.hello("worker") == b"OK"
        await client.send(b"WORK")
        for _ in range(10):
            await anyio.sleep(0.15)
            await client.send(b"PING")
        assert await client.line() == b"ACK WORK"
        assert not closes(events, CloseReason.IDLE_TIMEOUT)
        assert server.stats().spared >= 1
        await client.aclose()
        await server.shutdown()


async def test_shutdown_under_tls_says_goodbye_then_close_notify(pki: Pki) -> None:
    events: list[ServerEvent] = []
    config = ServerConfig(shutdown_grace=3.0, **BASE)
    async with serving(config, events=events, ssl_context=pki.server_context()) as (server, port):
        client = await Client.connect(port, tls=pki.client_context(), strict=True)
        assert await client.hello("leaving") == b"OK"
        async with anyio.create_task_group() as tasks:
            started = time.monotonic()
            tasks.start_soon(server.shutdown)
            assert (await client.line()).startswith(b"GOAWAY ")
            # Strict TLS ends the stream cleanly only after close_notify.
            with pytest.raises(anyio.EndOfStream):
                await client.line()
            await client.aclose()
        assert time.monotonic() - started < slack(1.0)  # the peer left: no grace waited out
        [closed] = closes(events, CloseReason.SHUTDOWN)
        assert closed.identity == "leaving"


async def test_a_client_context_is_refused_before_anything_is_bound(pki: Pki) -> None:
    server = Server(identify=identify, handler=identify, framer=LineFramer)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="client context"):
        await server.serve_tcp("127.0.0.1", 0, ssl_context=pki.client_context())
