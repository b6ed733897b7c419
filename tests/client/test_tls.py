"""keepconn.client over TLS, against keepconn's own TLS server, on asyncio, uvloop and trio.

A device must refuse a server it cannot trust (expired, signed by another CA, made out for
another name) and say so in its disconnect record, then back off and retry like after any other
failure; and a server that accepts TCP but never answers the handshake must not hold it.
"""

from __future__ import annotations

import anyio
import anyio.abc
import pytest

from keepconn import CloseReason, ConfigError, ServerEvent
from keepconn.client import ClientConfig, Connector, DisconnectReason
from tests.client.test_connector import FAST, Recorder, framer, hello_as, listening, plain
from tests.lineapp import closes, serving
from tests.tlscerts import Pair, Pki

pytestmark = pytest.mark.anyio


def subject_cn(cert: dict[str, object] | None) -> str | None:
    for rdn in (cert or {}).get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


async def test_a_tls_session_with_a_client_certificate(pki: Pki) -> None:
    seen: list[str | None] = []
    async with serving(plain(), ssl_context=pki.server_context(clients="required")) as (
        server,
        port,
    ):
        connector = Connector(
            "127.0.0.1",
            port,
            framer=framer,
            hello=hello_as("dev-tls"),
            config=ClientConfig(backoff=FAST, tls=pki.client_context(pki.alice)),
        )
        async with connector.sessions() as sessions:
            with anyio.fail_after(5):
                conn = await sessions.receive()
            assert conn.tls_version == "TLSv1.3"
            assert subject_cn(conn.peer_certificate) == "localhost"
            await conn.send(b"DATA 1\n")
            assert await conn.receive() == b"ACK 1"
            [server_conn] = server.connections
            seen.append(subject_cn(server_conn.peer_certificate))
            # Socket options go on the TCP socket beneath TLS.
            assert conn.raw_socket().getpeername()[1] == port
            conn.close()
    assert seen == ["alice"]


@pytest.mark.parametrize(
    ("which", "words"),
    [
        ("expired_server", "certificate has expired"),
        ("rogue_server", "unable to get local issuer certificate"),
        ("wrong_host_server", "IP address mismatch"),
    ],
)
async def test_an_untrustworthy_server_certificate_is_refused_and_retried(
    pki: Pki, which: str, words: str
) -> None:
    events: list[ServerEvent] = []
    recorder = Recorder()
    pair: Pair = getattr(pki, which)
    async with serving(plain(), events=events, ssl_context=pki.server_context(pair)) as (
        server,
        port,
    ):
        connector = Connector(
            "127.0.0.1",
            port,
            framer=framer,
            hello=hello_as("careful"),
            config=ClientConfig(backoff=FAST, tls=pki.client_context()),
            on_disconnect=recorder,
        )
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(connector.run, hello_as("never"))
            await recorder.wait(2)
            tasks.cancel_scope.cancel()
        assert server.registry.stats().live == 0
    first = recorder.records[0]
    assert first.reason is DisconnectReason.TLS_FAILED
    assert first.error.startswith("TLS handshake failed: CERTIFICATE_VERIFY_FAILED"), first.error
    assert words in first.error, first.error
    assert not first.established
    assert recorder.reasons[1] is DisconnectReason.TLS_FAILED  # backed off, tried again
    # The device's alert tells the server why: its log says the device does not trust it.
    refused = closes(events, CloseReason.TLS_FAILED)
    assert refused and all("ALERT" in closed.detail for closed in refused), refused


async def test_server_hostname_checks_the_name_on_the_certificate(pki: Pki) -> None:
    async with serving(plain(), ssl_context=pki.server_context(pki.wrong_host_server)) as (
        _,
        port,
    ):
        config = ClientConfig(
            backoff=FAST, tls=pki.client_context(), server_hostname="other.example"
        )
        connector = Connector("127.0.0.1", port, framer=framer, hello=hello_as("x"), config=config)
        async with connector.sessions() as sessions:
            with anyio.fail_after(5):
                conn = await sessions.receive()
            assert subject_cn(conn.peer_certificate) == "other.example"
            conn.close()


async def test_a_server_that_never_answers_the_handshake_is_a_hello_timeout() -> None:
    recorder = Recorder()

    async def mute(stream: anyio.abc.SocketStream) -> None:
        await anyio.sleep_forever()

    async with listening(mute) as port:
        connector = Connector(
            "127.0.0.1",
            port,
            framer=framer,
            config=ClientConfig(backoff=FAST, hello_timeout=0.3, tls=True),
            on_disconnect=recorder,
        )
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(connector.run, hello_as("never"))
            await recorder.wait(1)
            tasks.cancel_scope.cancel()
    [first, *_] = recorder.records
    assert first.reason is DisconnectReason.HELLO_TIMEOUT
    assert first.error == "no TLS handshake within 0.3 s"


def test_tls_settings_are_checked_when_built(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="tls"):
        ClientConfig(tls="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="client context"):
        ClientConfig(tls=pki.server_context())
    with pytest.raises(ConfigError, match="server_hostname"):
        ClientConfig(server_hostname="")
    assert ClientConfig().ssl_context() is None
    assert ClientConfig(tls=True).ssl_context() is not None
