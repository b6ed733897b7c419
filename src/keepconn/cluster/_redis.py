"""The Redis adapter of the ownership rules, on coredis (anyio-native: asyncio, uvloop, trio).

Every call is one round trip (a script, or one pipeline); the server bounds each with
``store_timeout``. Nothing about ownership is cached here: the server's core keeps what this
node holds, the store is asked whenever it matters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio

try:
    import coredis
    import coredis.exceptions
    import coredis.retry
except ImportError as exc:
    # Name the extra to install, rather than leave a bare "No module named" to puzzle over.
    raise ImportError("keepconn.cluster needs coredis: pip install 'keepconn[redis]'") from exc

from .._anyio.failures import errors_in
from .._core.errors import StoreUnavailable
from .._core.ownership import Claim, ClusterConfig, ClusterStats
from . import _scripts

__all__ = ["RedisCluster", "node_id_default"]

logger = logging.getLogger("keepconn.cluster")

#: The window of an identity's recent claims (ms) when no flapping limit is given.
_HITS_WINDOW_MS = 60_000
#: Pause between two attempts to subscribe while the store is unreachable (seconds).
_RESUBSCRIBE_PAUSE = 0.1

#: What coredis raises when the store is gone, slow or refusing (anyio's stream errors included).
_FAILURES: tuple[type[Exception], ...] = (
    coredis.exceptions.RedisError,
    ConnectionError,
    OSError,
    TimeoutError,
    EOFError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
)


def _store_failure(exc: BaseException) -> bool:
    """True if ``exc`` (or every member of its groups but cancellations: coredis raises from
    task groups) is the store failing, not a bug. A cancellation beside it is not lost: the
    caller's next checkpoint raises it again, its scope being cancelled still."""
    errors = errors_in(exc)  # the server's own walk of exception groups
    if not errors:  # None (a KeyboardInterrupt and the like) or only cancellations
        return False
    return all(isinstance(error, _FAILURES) for error in errors)


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern (a prefix may hold ``*``, ``?``, ``[``)."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def node_id_default() -> str:
    """A node id for this process: ``HOST-PID`` (unique on a host, readable in logs)."""
    return f"{socket.gethostname()}-{os.getpid()}"


class RedisCluster:
    """One node's connection to a Redis store: give it to ``keepconn.Server(cluster=...)``.

    :param url: ``redis://HOST:PORT[/DB]`` (``rediss://`` for TLS, as coredis reads it).
    :param config: the node's :class:`ClusterConfig` (its ``node_id`` above all).

    The server connects it when it starts serving and closes it when it stops; one instance
    serves one server. :meth:`stats` reports the node's state once it runs.
    """

    def __init__(self, url: str, config: ClusterConfig) -> None:
        if not isinstance(config, ClusterConfig):
            raise TypeError(f"config must be a ClusterConfig, got {config!r}")
        self.url = url
        self._config = config
        prefix = config.key_prefix
        self._prefix = prefix
        self._lease = f"{prefix}:node:{config.node_id}"
        self._channel = f"{prefix}:evict:{config.node_id}"
        self._client: coredis.Redis[str] | None = None
        self._stats: Callable[[], ClusterStats | None] | None = None
        self._scripts: dict[str, Any] = {}
        # The store's clock minus ours (microseconds), measured at each renewal.
        self._offset_us: int | None = None

    @property
    def config(self) -> ClusterConfig:
        """The node's configuration."""
        return self._config

    @property
    def node_id(self) -> str:
        """This node's id."""
        return self._config.node_id

    def stats(self) -> ClusterStats | None:
        """The node's cluster state (None until a server runs this store)."""
        return None if self._stats is None else self._stats()

    def attach(self, stats: Callable[[], ClusterStats | None]) -> None:
        """Called by the server that runs this store (one server per instance)."""
        if self._stats is not None:
            raise RuntimeError("a RedisCluster serves one Server; make one per server")
        self._stats = stats

    def __repr__(self) -> str:
        return f"<RedisCluster {self.url} node={self.node_id!r}>"

    # -- the client

    def _new_client(self) -> coredis.Redis[str]:
        timeout = self._config.store_timeout
        return coredis.Redis.from_url(
            self.url,
            decode_responses=True,
            connect_timeout=timeout,
            stream_timeout=timeout,
            # The server retries on its own schedule and must know of every failure at once.
            retry_policy=coredis.retry.NoRetryPolicy(),
            verify_version=False,
        )

    @contextlib.asynccontextmanager
    async def connected(self) -> AsyncIterator[None]:
        """Hold the client open while the server runs."""
        client = self._new_client()
        self._client = client
        for name, source in (
            ("claim", _scripts.CLAIM),
            ("renew", _scripts.RENEW),
            ("release", _scripts.RELEASE),
            ("reassert", _scripts.REASSERT),
            ("collect", _scripts.COLLECT),
        ):
            self._scripts[name] = client.register_script(source)
        try:
            async with client:
                yield
        finally:
            self._client = None

    def _ready(self) -> coredis.Redis[str]:
        if self._client is None:
            raise StoreUnavailable("the store is not connected (the server is not serving)")
        return self._client

    async def _script(self, name: str, keys: list[str], args: list[str | int]) -> Any:
        self._ready()
        try:
            return await self._scripts[name](keys, args)
        except Exception as exc:
            if not _store_failure(exc):
                raise
            raise StoreUnavailable(f"{name}: {type(exc).__name__}: {exc}") from exc

    # -- the ClusterStore protocol (called by the server)

    async def renew(self) -> bool:
        """Renew this node's lease; False if it was gone (made anew)."""
        ttl_ms = int(self._config.node_ttl * 1000)
        sent = time.time()
        existed, seconds, micros = await self._script(
            "renew", [self._lease], [ttl_ms, self.node_id]
        )
        # The store's clock against ours, to within half a round trip: claims carry deadlines
        # in the store's time, so this node's clock need not agree with the store's.
        store_us = int(seconds) * 1_000_000 + int(micros)
        self._offset_us = store_us - int((sent + time.time()) / 2 * 1_000_000)
        return bool(int(existed))

    async def claim(
        self,
        key: str,
        host: str,
        limit: tuple[int, float] | None = None,
        duplicates: tuple[int, float, float] | None = None,
    ) -> Claim:
        """Claim ``key`` for this node, telling the previous owner (one round trip).

        ``limit``: (most claims, window seconds) of the identity cluster-wide; one more is
        refused (``Claim.flapping``) without touching the current owner. ``duplicates``:
        (most claims from another host than the owner's, window, hold seconds); one more
        holds the identity as duplicated, and claims from another host are refused
        (``Claim.duplicate``) for the hold."""
        prefix = self._prefix
        if self._offset_us is None:
            raise StoreUnavailable("claim: the store's clock is not known yet (no renewal)")
        deadline = int(time.time() * 1_000_000) + self._offset_us
        deadline += int(self._config.store_timeout * 1_000_000)
        most, window_ms = (
            (0, _HITS_WINDOW_MS) if limit is None else (limit[0], int(limit[1] * 1000))
        )
        moves, moves_ms, hold_ms = (
            (0, 0, 0)
            if duplicates is None
            else (duplicates[0], int(duplicates[1] * 1000), int(duplicates[2] * 1000))
        )
        reply = await self._script(
            "claim",
            [
                f"{prefix}:owner:{key}",
                f"{prefix}:hits:{key}",
                f"{prefix}:dup:{key}",
                f"{prefix}:moves:{key}",
            ],
            [self.node_id, host, prefix, window_ms, key, deadline, most, moves, moves_ms, hold_ms],
        )
        epoch, previous, previous_host, recent = reply
        if epoch == "0":
            raise StoreUnavailable("claim: reached the store after its deadline (a stall)")
        if epoch == "-1":
            return Claim(epoch=0, recent=int(recent), flapping=True)
        if epoch == "-2":
            return Claim(
                epoch=0,
                previous_node=previous or None,
                previous_host=previous_host or None,
                recent=int(recent),
                duplicate=True,
            )
        return Claim(
            epoch=int(epoch),
            previous_node=previous or None,
            previous_host=previous_host or None,
            recent=int(recent),
        )

    async def release(self, held: Sequence[tuple[str, int]]) -> None:
        """Delete each ``(key, epoch)`` record that is still this node's claim with that
        epoch (a newer owner's record is left alone), in one pipelined round trip."""
        await self._pipelined("release", held, [self.node_id])

    async def owners(self, keys: Sequence[str]) -> list[str | None]:
        """The node holding each key (None: no record), in one pipelined round trip."""
        client = self._ready()
        try:
            async with client.pipeline(transaction=False) as pipe:
                results = [pipe.get(f"{self._prefix}:owner:{key}") for key in keys]
            values = [await result for result in results]
        except Exception as exc:
            if not _store_failure(exc):
                raise
            raise StoreUnavailable(f"owners: {type(exc).__name__}: {exc}") from exc
        owners: list[str | None] = []
        for value in values:
            parts = None if value is None else str(value).split("\t")
            owners.append(parts[1] if parts is not None and len(parts) >= 2 else None)
        return owners

    async def reassert(self, held: Sequence[tuple[str, int]]) -> list[bool]:
        """Recreate missing records; False where another node holds the key now."""
        values = await self._pipelined("reassert", held, [self.node_id, ""])
        return [bool(int(value)) for value in values]

    async def _pipelined(
        self, name: str, held: Sequence[tuple[str, int]], args: list[str | int]
    ) -> list[Any]:
        """Run script ``name`` once per ``(key, epoch)`` owner record, in one round trip."""
        client = self._ready()
        script = self._scripts[name]
        try:
            async with client.pipeline(transaction=False) as pipe:
                results = [
                    script([f"{self._prefix}:owner:{key}"], [str(epoch), *args], pipe)
                    for key, epoch in held
                ]
            return [await result for result in results]
        except Exception as exc:
            if not _store_failure(exc):
                raise
            raise StoreUnavailable(f"{name}: {type(exc).__name__}: {exc}") from exc

    async def collect(self) -> int | None:
        """One step of the collector of dead nodes' owner records: the number deleted, or
        None when another node ran a step within ``collect_interval`` (or it is off)."""
        config = self._config
        if config.collect_interval is None:
            return None
        prefix = self._prefix
        deleted, _complete = await self._script(
            "collect",
            [f"{prefix}:collect:lock", f"{prefix}:collect:cursor"],
            [
                self.node_id,
                max(1, int(config.collect_interval * 1000)),
                config.collect_batch,
                _glob_escape(f"{prefix}:owner:") + "*",
                prefix,
            ],
        )
        return None if int(deleted) < 0 else int(deleted)

    async def leave(self) -> None:
        """Give up the lease (clean shutdown): claims now know this node is gone."""
        try:
            await self._ready().delete([self._lease])
        except Exception as exc:
            if not _store_failure(exc):
                raise
            raise StoreUnavailable(f"leave: {type(exc).__name__}: {exc}") from exc

    async def listen(
        self, on_notice: Callable[[str, int, str], None], on_subscribed: Callable[[], None]
    ) -> None:
        """Receive eviction notices for ever, resubscribing whenever the subscription is lost
        (a killed pub/sub connection, a store restart); ``on_subscribed`` after each."""
        client = self._ready()
        while True:
            try:
                async with client.pubsub(
                    channels=[self._channel],
                    ignore_subscribe_messages=True,
                    retry_policy=coredis.retry.NoRetryPolicy(),
                    subscription_timeout=self._config.store_timeout,
                ) as pubsub:
                    on_subscribed()
                    async for message in pubsub:
                        self._notice(message, on_notice)
            except BaseException as exc:
                # A group of cancellations and the connection's errors (coredis's cleanup as
                # it is cancelled) is dropped: the sleep below raises the cancellation anew.
                if not _store_failure(exc):
                    raise
                logger.info("cluster: subscription lost (%s); resubscribing", exc)
            await anyio.sleep(_RESUBSCRIBE_PAUSE)

    @staticmethod
    def _notice(message: Any, on_notice: Callable[[str, int, str], None]) -> None:
        if message.get("type") != "message":
            return
        data = str(message.get("data", ""))
        key, sep, rest = data.rpartition("\t")
        key, sep2, epoch = key.rpartition("\t")
        if not (sep and sep2 and epoch.isdigit()):
            logger.warning("cluster: malformed notice %r", data)
            return
        on_notice(key, int(epoch), rest)
