"""pytest fixtures for real-fault tests: ``netns`` (one namespace) and ``netns_factory`` (many),
and ``redis_server`` / ``redis_factory`` (throwaway redis-servers for the cluster tests).

Enable with ``pytest_plugins = ["keepconn.testing.pytest_plugin"]`` in a conftest.py. Mark the
tests ``@pytest.mark.netns``. Where namespaces cannot be built (not root, no iproute2, not Linux)
they skip with the reason; with ``KEEPCONN_REQUIRE_NETNS=1`` in the environment (as CI sets)
that skip becomes a failure, so a fault test can never pass by not running. The same flag
turns a missing ``redis-server`` from a skip into a failure.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from ._netns import NetNs, NetnsError, cleanup_stale, netns_unavailable_reason
from ._redis import RedisServer, RedisServerError, redis_unavailable_reason

__all__ = [
    "netns",
    "netns_factory",
    "redis_factory",
    "redis_server",
    "require_netns",
    "require_redis",
]

#: Set to "1" to turn "cannot build a namespace here" from a skip into a failure.
REQUIRE_ENV = "KEEPCONN_REQUIRE_NETNS"


def require_netns(reason: str) -> None:
    """Skip the running test because of ``reason``, or fail it when namespaces are required."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but network namespaces are unavailable: {reason}")
    pytest.skip(f"needs network namespaces: {reason}")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Sweep namespaces left by killed runs, so names and subnets never pile up."""
    try:
        cleanup_stale()
    except NetnsError:
        pass


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip (or fail) every ``netns``-marked test up front when namespaces are unavailable."""
    if item.get_closest_marker("netns") is not None:
        reason = netns_unavailable_reason()
        if reason is not None:
            require_netns(reason)


@pytest.fixture
def netns_factory() -> Iterator[Callable[[], NetNs]]:
    """Call it to get a fresh :class:`NetNs`; all of them are deleted when the test ends,
    whether it passed or not."""
    made: list[NetNs] = []

    def make() -> NetNs:
        reason = netns_unavailable_reason()
        if reason is not None:
            require_netns(reason)
        try:
            ns = NetNs()
        except NetnsError as exc:
            require_netns(str(exc))
        made.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in reversed(made):
            ns.close()


@pytest.fixture
def netns(netns_factory: Callable[[], NetNs]) -> NetNs:
    """One network namespace with a veth pair (see :class:`keepconn.testing.NetNs`)."""
    return netns_factory()


def require_redis(reason: str) -> None:
    """Skip the running test because redis-server cannot run (``reason``), or fail it under
    ``KEEPCONN_REQUIRE_NETNS=1``: CI installs redis-server, so a missing one is a broken setup."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but redis-server is unavailable: {reason}")
    pytest.skip(f"needs redis-server: {reason}")


@pytest.fixture
def redis_factory() -> Iterator[Callable[[], RedisServer]]:
    """Call it to start a fresh :class:`keepconn.testing.RedisServer`; every one is stopped
    (by pid) and its directory removed when the test ends, whether it passed or not."""
    made: list[RedisServer] = []

    def make() -> RedisServer:
        reason = redis_unavailable_reason()
        if reason is not None:
            require_redis(reason)
        redis = RedisServer()
        made.append(redis)
        try:
            return redis.start()
        except RedisServerError as exc:
            require_redis(str(exc))
            raise  # not reached: require_redis skips or fails

    try:
        yield make
    finally:
        for redis in reversed(made):
            redis.close()


@pytest.fixture
def redis_server(redis_factory: Callable[[], RedisServer]) -> RedisServer:
    """One running throwaway redis-server (see :class:`keepconn.testing.RedisServer`)."""
    return redis_factory()
