"""A throwaway redis-server for tests and demos: loopback, no persistence, stopped by pid.

The cluster tests need a real store that they can stall (SIGSTOP), lose (a restart without
persistence) and kill, so this starts Debian's ``redis-server`` as a child process on a free
loopback port, in a temporary directory of its own, and never touches any other Redis.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType

from .._core.errors import KeepconnError

__all__ = ["RedisServer", "RedisServerError", "redis_unavailable_reason"]

#: How long a start (or a restart) may take before it is an error: redis-server answers PING
#: within milliseconds on an idle machine; this is for a loaded one.
_START_TIMEOUT = 15.0


class RedisServerError(KeepconnError):
    """A throwaway redis-server could not be started, or stopped answering."""


def redis_unavailable_reason() -> str | None:
    """Why a throwaway redis-server cannot be started here (None when it can)."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (see scripts/sysdeps.sh)"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _ping(port: int, timeout: float) -> bool:
    """One PING over a fresh connection, in Redis's inline protocol."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A redis-server child process on ``127.0.0.1:port`` with no persistence.

    Use it as a context manager (``with RedisServer() as redis:``, or ``async with``: starting
    takes milliseconds, so the async form simply runs the same steps), or call :meth:`start`
    and :meth:`stop`. ``url`` is what a client connects to. :meth:`pause` and :meth:`resume`
    stall it with SIGSTOP/SIGCONT (connections stay open, nothing answers); :meth:`restart`
    kills it and starts a new one on the same port, which comes back empty, as a store without
    persistence does after a crash.
    """

    def __init__(self, port: int | None = None, *, extra_args: tuple[str, ...] = ()) -> None:
        #: The loopback port; chosen free at construction unless given.
        self.port = port if port is not None else _free_port()
        self._extra_args = extra_args
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        """The running server's pid (RedisServerError when it is not running)."""
        if self._process is None:
            raise RedisServerError("redis-server is not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        """True while the child process is alive (paused included)."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING; returns self."""
        reason = redis_unavailable_reason()
        if reason is not None:
            raise RedisServerError(reason)
        if self.running:
            raise RedisServerError("already running")
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="keepconn-redis-")
        argv = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir.name,
            "--daemonize",
            "no",
            "--logfile",
            os.path.join(self._dir.name, "redis.log"),
            # Tests stall it with DEBUG SLEEP too (from loopback only).
            "--enable-debug-command",
            "local",
            *self._extra_args,
        ]
        self._process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while not _ping(self.port, 0.5):
            if self._process.poll() is not None:
                stderr = self._process.stderr
                err = stderr.read().decode(errors="replace") if stderr is not None else ""
                self._process = None
                raise RedisServerError(f"redis-server exited at start: {err.strip()}{self._log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RedisServerError(f"redis-server did not answer PING on port {self.port}")
            time.sleep(0.01)
        return self

    def _log(self) -> str:
        if self._dir is None:
            return ""
        try:
            with open(os.path.join(self._dir.name, "redis.log")) as log:
                return "\n" + log.read()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Kill the server (its pid only) and wait for it; safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            if self._paused:
                # A stopped process does not act on SIGTERM until continued.
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)
            process.kill()
        if process is not None:
            process.wait(timeout=_START_TIMEOUT)
            if process.stderr is not None:
                process.stderr.close()
        self._paused = False

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def pause(self) -> None:
        """Stall the server (SIGSTOP): it keeps its connections and answers nothing."""
        os.kill(self.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Let a paused server go on (SIGCONT)."""
        os.kill(self.pid, signal.SIGCONT)
        self._paused = False

    def restart(self) -> None:
        """Kill the server and start a new one on the same port: it comes back empty."""
        self.stop()
        self.start()

    # -- context managers

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> RedisServer:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer 127.0.0.1:{self.port} {state}>"
