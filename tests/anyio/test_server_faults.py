"""The server against real faults: a cable-pulled peer in a network namespace, a SIGSTOPped
peer process (its kernel still ACKs), and a server process out of file descriptors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import anyio.abc
import pytest

from keepconn import ActiveHeartbeat, CloseReason, ServerConfig, ServerEvent
from keepconn.tcp import TcpKeepalive, census
from keepconn.testing import NetNs
from tests.lineapp import Client, closes, serving, wait_for
from tests.timing import slack

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]
BASE = dict(admission=None, flapping=None)


async def device_client(ns: NetNs, port: int) -> Client:
    """A client whose socket lives inside the namespace, wrapped as an anyio stream."""
    sock = await anyio.to_thread.run_sync(ns.connect, (ns.host_addr, port))
    sock.setblocking(False)
    return Client(await anyio.abc.SocketStream.from_socket(sock))


@pytest.mark.netns
async def test_cable_pulled_peer_is_reaped_by_the_application_heartbeat(netns: NetNs) -> None:
    events: list[ServerEvent] = []
    beat = ActiveHeartbeat(interval=0.5, timeout=0.4, misses=1)
    config = ServerConfig(idle_timeout=60, heartbeat=beat, **BASE)
    async with serving(config, host=netns.host_addr, events=events) as (server, port):
        device = await device_client(netns, port)
        assert await device.hello("pulled") == b"OK"
        assert await device.line() == b"PING"
        await device.send(b"PONG")
        await wait_for(lambda: server.registry.get("pulled") is not None)
        netns.cable_pull()
        pulled = time.monotonic()
        await wait_for(
            lambda: bool(closes(events, CloseReason.HEARTBEAT_TIMEOUT)), timeout=slack(10)
        )
        took = time.monotonic() - pulled
        assert took <= beat.detection_bound + slack(0.5), took
        assert "pulled" not in server.registry
        await anyio.sleep(slack(0.05))
        # Closed abortively: nothing is left behind for the port in any state.
        assert census(port).counts.get("ESTABLISHED", 0) == 0
        assert census(port).counts.get("FIN_WAIT1", 0) == 0
        await device.aclose()


@pytest.mark.netns
async def test_cable_pulled_peer_is_reaped_by_kernel_keepalive_alone(netns: NetNs) -> None:
    events: list[ServerEvent] = []
    keepalive = TcpKeepalive(idle=1, interval=1, count=2)
    config = ServerConfig(idle_timeout=600, keepalive=keepalive, **BASE)
    async with serving(config, host=netns.host_addr, events=events) as (server, port):
        device = await device_client(netns, port)
        assert await device.hello("quiet") == b"OK"
        last = time.monotonic()
        netns.cable_pull()
        await wait_for(
            lambda: bool(closes(events, CloseReason.KEEPALIVE_TIMEOUT)),
            timeout=keepalive.detection_bound() + slack(5),
        )
        took = time.monotonic() - last
        assert took <= keepalive.detection_bound() + slack(1), took
        [closed] = closes(events, CloseReason.KEEPALIVE_TIMEOUT)
        assert closed.identity == "quiet" and closed.detail == "ETIMEDOUT"
        await device.aclose()


STOPPABLE_PEER = textwrap.dedent(
    """
    import socket, sys
    sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    sock.sendall(b"HELLO stopped secret\\n")
    buffer = b""
    while True:
        data = sock.recv(4096)
        if not data:
            break
        buffer += data
        while b"\\n" in buffer:
            line, buffer = buffer.split(b"\\n", 1)
            if line == b"OK":
                print("ready", flush=True)
            elif line == b"PING":
                sock.sendall(b"PONG\\n")
    """
)


async def test_sigstopped_peer_is_reaped_by_the_application_heartbeat() -> None:
    events: list[ServerEvent] = []
    # Generous answer time and one tolerated miss: a loaded CI machine may delay a PONG.
    beat = ActiveHeartbeat(interval=0.5, timeout=0.4, misses=1)
    config = ServerConfig(idle_timeout=60, heartbeat=beat, **BASE)
    async with serving(config, events=events) as (server, port):
        peer = subprocess.Popen(
            [sys.executable, "-c", STOPPABLE_PEER, str(port)], stdout=subprocess.PIPE
        )
        try:
            assert peer.stdout is not None
            line = await anyio.to_thread.run_sync(peer.stdout.readline)
            assert line == b"ready\n"
            # It answers pings while it runs...
            await anyio.sleep(4 * beat.interval)
            assert "stopped" in server.registry
            assert not closes(events, CloseReason.HEARTBEAT_TIMEOUT)
            # ...and its kernel keeps ACKing once stopped, so only the heartbeat can tell.
            os.kill(peer.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            await wait_for(
                lambda: bool(closes(events, CloseReason.HEARTBEAT_TIMEOUT)), timeout=slack(10)
            )
            assert time.monotonic() - stopped <= beat.detection_bound + slack(0.5)
        finally:
            os.kill(peer.pid, signal.SIGKILL)
            os.kill(peer.pid, signal.SIGCONT)
            peer.wait(timeout=slack(10))


EMFILE_SERVER = textwrap.dedent(
    """
    import resource, sys
    import anyio
    from keepconn import ServerConfig
    from tests.lineapp import make_server

    LIMIT = int(sys.argv[1])

    async def main():
        resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))
        server = make_server(ServerConfig(admission=None, flapping=None))
        async with anyio.create_task_group() as tasks:
            addresses = await tasks.start(server.serve_tcp, "127.0.0.1", 0)
            print("port", addresses[0][1], flush=True)
            await anyio.sleep(60)
            tasks.cancel_scope.cancel()

    anyio.run(main, backend=sys.argv[2])
    """
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_emfile_does_not_stop_the_server(backend: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", EMFILE_SERVER, "48", backend],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    clients: list[Client] = []
    try:
        assert proc.stdout is not None
        line = await anyio.to_thread.run_sync(proc.stdout.readline)
        port = int(line.split()[1])
        # Far more connections than the server has descriptors: the kernel completes every
        # handshake, but the server's accept() fails with EMFILE for most of them.
        for i in range(80):
            client = await Client.connect(port)
            await client.send(b"HELLO dev%d secret" % i)
            clients.append(client)
        served = []
        for client in clients:
            with anyio.move_on_after(slack(0.05)):
                if await client.line() == b"OK":
                    served.append(client)
        assert 10 < len(served) < 80, len(served)
        # The live sessions keep working while accept is starved.
        await served[0].send(b"DATA alive")
        assert await served[0].line() == b"ACK alive"
        assert proc.poll() is None
        # Free descriptors: accepts resume and the waiting devices get their answer.
        for client in served[1:]:
            await client.aclose()
        waiting = [c for c in clients if c not in served]
        for client in waiting[:20]:
            assert await client.line(timeout=slack(10)) == b"OK"
        await served[0].send(b"DATA still")
        assert await served[0].line() == b"ACK still"
    finally:
        for client in clients:
            await client.aclose()
        proc.terminate()
        _, err = await anyio.to_thread.run_sync(proc.communicate)
    assert b"EMFILE" in err, err[-2000:]
    assert b"Traceback" not in err, err[-2000:]
