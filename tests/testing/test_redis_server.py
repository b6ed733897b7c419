"""keepconn.testing.RedisServer: a real throwaway redis-server, stalled, restarted, stopped."""

from __future__ import annotations

import os
import socket
import time

import pytest

from keepconn.testing import RedisServer, RedisServerError


def command(port: int, line: bytes, timeout: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(line + b"\r\n")
        return conn.recv(4096)


def test_it_starts_on_loopback_without_persistence_and_stops_by_pid(
    redis_server: RedisServer,
) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert command(redis_server.port, b"PING") == b"+PONG\r\n"
    assert command(redis_server.port, b"CONFIG GET save").endswith(b"save\r\n$0\r\n\r\n")
    assert b"no" in command(redis_server.port, b"CONFIG GET appendonly")
    pid = redis_server.pid
    redis_server.stop()
    assert not redis_server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(RedisServerError):
        redis_server.pid  # noqa: B018


def test_pause_stalls_it_and_resume_lets_it_answer(redis_server: RedisServer) -> None:
    redis_server.pause()
    try:
        with pytest.raises(TimeoutError):
            command(redis_server.port, b"PING", timeout=0.3)
    finally:
        redis_server.resume()
    assert command(redis_server.port, b"PING") == b"+PONG\r\n"


def test_a_restart_keeps_the_port_and_loses_the_data(redis_server: RedisServer) -> None:
    assert command(redis_server.port, b"SET k v") == b"+OK\r\n"
    old_pid, port = redis_server.pid, redis_server.port
    started = time.monotonic()
    redis_server.restart()
    assert time.monotonic() - started < 5
    assert (redis_server.port, redis_server.pid != old_pid) == (port, True)
    assert command(redis_server.port, b"GET k") == b"$-1\r\n"


def test_as_a_context_manager_it_cleans_up() -> None:
    with RedisServer() as redis:
        assert command(redis.port, b"PING") == b"+PONG\r\n"
        pid = redis.pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
