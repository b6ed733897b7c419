"""Where the gateway puts telemetry: a replaceable sink, and the recorder that feeds it in order.

A :class:`Sink` is plain blocking code (a database driver, a file, a message queue client). The
gateway never calls it on the event loop: :class:`Recorder` collects records from every
connection into one queue, and a single task hands them to the sink in batches on a worker
thread. That gives three properties the gateway relies on:

* order: records reach the sink in the order the gateway received them (one queue, one writer);
* durability before acknowledgement: a QoS 1 PUBLISH is answered with PUBACK only after the
  batch holding it has been written (:meth:`Recorder.store` returns when it has);
* bounded memory: the queue has a fixed size, so a disk slower than the fleet pushes back on the
  connections (their reads pause) instead of growing without limit.

To store telemetry elsewhere, write a class with ``write(records)`` and ``close()`` and pass it to
:class:`Recorder` (see README.md).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import anyio
import anyio.abc
import attrs

__all__ = ["Recorder", "Sink", "SinkError", "SQLiteSink", "Telemetry"]

logger = logging.getLogger("gateway.sink")


@attrs.frozen
class Telemetry:
    """One message a device published, as the gateway received it."""

    #: Wall-clock time of receipt (seconds since the epoch), for humans and joins.
    received: float
    username: str
    client_id: str
    topic: str
    payload: bytes
    qos: int
    retain: bool = False


class Sink(Protocol):
    """Stores telemetry. Called from one worker thread at a time, never on the event loop."""

    def write(self, records: Sequence[Telemetry]) -> None:
        """Store ``records`` (in order) durably, or raise. Once this returns they are stored."""
        ...

    def close(self) -> None:
        """Release resources; nothing is written after this."""
        ...


class SinkError(Exception):
    """The sink failed to store a record; the message was not acknowledged."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS telemetry (
    id        INTEGER PRIMARY KEY,
    received  REAL    NOT NULL,
    username  TEXT    NOT NULL,
    client_id TEXT    NOT NULL,
    topic     TEXT    NOT NULL,
    qos       INTEGER NOT NULL,
    retain    INTEGER NOT NULL,
    payload   BLOB    NOT NULL
)
"""


class SQLiteSink:
    """Appends telemetry to the ``telemetry`` table of an SQLite file.

    WAL mode lets other programs (a dashboard, the tests) read the file while the gateway writes.
    ``synchronous="FULL"`` makes each committed batch survive a power cut, which is what "stored"
    must mean before a PUBACK; the cost is one fsync per batch, not per message, because the
    recorder batches.
    """

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}")
        self.path = Path(path)
        # The recorder calls from whichever worker thread anyio picks, but never two at once.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.execute(_SCHEMA)

    def write(self, records: Sequence[Telemetry]) -> None:
        """Insert ``records`` in one transaction."""
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany(
                "INSERT INTO telemetry (received, username, client_id, topic, qos, retain, payload)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (r.received, r.username, r.client_id, r.topic, r.qos, int(r.retain), r.payload)
                    for r in records
                ],
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        """Close the database file."""
        self._db.close()


@attrs.define(eq=False)
class _Entry:
    record: Telemetry
    # Set once the record's batch is written (or failed); None when nobody waits (QoS 0).
    done: anyio.Event | None = None
    failed: bool = False


#: Seconds the recorder waits after a batch's first record for more to join it (see run).
#: At the churn benchmark's 1,000 messages a second a record came alone: a batch each, its
#: own fsync (0.2 ms here), its own hand-off to a thread and back (a wake-up of the event
#: loop), about a quarter of the gateway's CPU. The price: a QoS 1 PUBACK up to this much
#: later.
LINGER = 0.005


class Recorder:
    """Feeds a :class:`Sink` from the event loop: one ordered queue, batched writes on a thread.

    Run :meth:`run` in a task for the life of the gateway; call :meth:`aclose` after the last
    connection has gone to write what is queued and stop.
    """

    def __init__(
        self,
        sink: Sink,
        *,
        queue_size: int = 10_000,
        batch_size: int = 500,
        linger: float = LINGER,
    ) -> None:
        if not linger >= 0:  # (NaN too)
            raise ValueError(f"linger must be a number of seconds >= 0, got {linger!r}")
        self.sink = sink
        self._batch_size = batch_size
        self._linger = linger
        self._send, self._receive = anyio.create_memory_object_stream[_Entry](queue_size)
        #: Records written since start.
        self.stored = 0
        #: Records the sink refused (their QoS 1 publishers were not acknowledged).
        self.failed = 0
        #: QoS 0 records dropped because the queue was full (never QoS 1: those wait).
        self.dropped = 0

    async def append(self, record: Telemetry) -> None:
        """Queue a record without waiting for it to be written (QoS 0). Waits only while the
        queue is full, which slows the sending connection down rather than losing data."""
        await self._queue(_Entry(record))

    def append_nowait(self, record: Telemetry) -> bool:
        """Queue a record if there is room; for callers that must not wait (a will, published
        while its connection is being torn down). Returns whether it was queued."""
        try:
            self._send.send_nowait(_Entry(record))
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.dropped += 1
            return False
        return True

    async def store(self, record: Telemetry) -> None:
        """Queue a record and return once it has been written (QoS 1: PUBACK after this).

        Raises SinkError if the sink failed to write it.
        """
        entry = _Entry(record, anyio.Event())
        await self._queue(entry)
        assert entry.done is not None
        await entry.done.wait()
        if entry.failed:
            raise SinkError(f"could not store the message on {record.topic!r}")

    async def _queue(self, entry: _Entry) -> None:
        # The stream's send() yields to the loop first even when there is room: a task step
        # for every message of every device. Waits only when the queue is full.
        try:
            self._send.send_nowait(entry)
        except anyio.WouldBlock:
            await self._send.send(entry)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Write queued records until :meth:`aclose` has been called and the queue is empty."""
        task_status.started()
        async with self._receive:
            async for first in self._receive:
                if self._linger:
                    # Group commit: the records of the next few milliseconds share the batch
                    # (one thread hand-off and one fsync), instead of one batch per record.
                    # Shielded, as the write is: a record taken is a record written.
                    with anyio.CancelScope(shield=True):
                        await anyio.sleep(self._linger)
                batch = [first]
                while len(batch) < self._batch_size:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                await self._write(batch)

    async def _write(self, batch: list[_Entry]) -> None:
        records = [entry.record for entry in batch]
        try:
            # Shielded: once a batch is handed to the thread its outcome must be reported to the
            # waiting publishers, even if the gateway is being cancelled meanwhile.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.sink.write, records)
        except Exception:
            logger.exception("sink failed to write %d records", len(records))
            self.failed += len(records)
            for entry in batch:
                entry.failed = True
        else:
            self.stored += len(records)
        for entry in batch:
            if entry.done is not None:
                entry.done.set()

    async def aclose(self) -> None:
        """No more records: :meth:`run` writes what is queued and returns."""
        await self._send.aclose()


def now_wall() -> float:
    """Wall-clock seconds for :attr:`Telemetry.received` (monotonic time means nothing on disk)."""
    return time.time()
