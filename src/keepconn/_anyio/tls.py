"""TLS over a connection's TCP stream: the handshake, and a close that never waits on a peer.

anyio's :class:`~anyio.streams.tls.TLSStream` does the record layer; the subclass here adds
what a server of long-lived connections needs on top of it:

* ``send_eof`` sends close_notify and then a FIN (anyio's refuses to half-close a TLS stream),
  so a graceful close under TLS reads on for its grace, just as it does on plain TCP;
* a close_notify that arrives after ours is an end of stream, not an error;
* :meth:`Tls.notify_close` says close_notify without waiting for the peer's answer: a dead
  peer never answers, and a close must not hang on it;
* a failed handshake still sends the alert OpenSSL wrote (unknown CA, certificate expired,
  protocol version), so the other side's log names the cause instead of a bare EOF.

Streams are always wrapped with ``standard_compatible=False``: a close never waits for the
peer's close_notify, and a peer that closes without one simply ends the stream. Waiting would
leave a dead peer's socket open for as long as the wait, which is what keepconn exists to
prevent; TLS 1.3 and HTTP/MQTT framing make the truncation attack this guards against moot.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream

from .._core.errors import ConfigError

__all__ = ["FLUSH_WAIT", "Tls", "check_server_context", "handshake_failure", "start_tls"]

T = TypeVar("T")

#: Seconds TLS may spend handing its last words (close_notify, an alert) to the kernel. A live
#: peer takes them at once; one whose window is closed is not reading, and must not hold us.
FLUSH_WAIT = 0.25


class Tls(TLSStream):
    """anyio's TLS stream with a half-close and a close_notify that never waits."""

    # The fields used below (_ssl_object, _read_bio, _write_bio, _flush_write_bio) are
    # anyio's; this class is the one place keepconn relies on them.

    #: Set once close_notify has been queued: it is said once.
    _notified = False

    def notify_close(self) -> bool:
        """Queue close_notify unless it already was: True if it was queued now."""
        if self._notified or self._broken:
            # Said already, or a record was lost on the way out: the peer could not even
            # decrypt it.
            return False
        self._notified = True
        try:
            self._ssl_object.unwrap()
        except ssl.SSLWantReadError:
            pass  # normal: ours is written, the peer's has not come, and we do not wait for it
        except ssl.SSLError:
            return False  # the connection failed: nothing to say
        return True

    async def say_close_notify(self) -> None:
        """Send close_notify if not sent yet; never waits for the answer. Bound the call: a
        peer whose window is closed never takes the bytes."""
        if self.notify_close():
            await self._flush_write_bio()

    async def send_eof(self) -> None:
        """close_notify, then a FIN on the TCP stream; reading goes on (a half-close)."""
        await self.say_close_notify()
        transport = self.transport_stream
        assert isinstance(transport, anyio.abc.SocketStream)
        await transport.send_eof()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        try:
            return await super().receive(max_bytes)
        except ssl.SSLZeroReturnError:
            # The peer's close_notify after ours (OpenSSL reports the completed shutdown as
            # an error): the peer has closed, which is an end of stream.
            raise anyio.EndOfStream from None

    async def _call_sslobject_method(self, func: Callable[..., T], *args: object) -> T:
        try:
            return await super()._call_sslobject_method(func, *args)
        except ssl.SSLError:
            # anyio gives up without sending what OpenSSL wrote last; for a failed handshake
            # that is the alert saying why. Best effort, bounded: the error is what matters.
            with anyio.move_on_after(FLUSH_WAIT):
                try:
                    await self._flush_write_bio()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass
            raise

    def buffered(self) -> int:
        """Bytes taken from the kernel that the application has not read yet: ciphertext
        waiting in the read buffer and decrypted bytes of a record partly read."""
        return self._read_bio.pending + self._ssl_object.pending()


async def start_tls(
    transport: anyio.abc.SocketStream,
    context: ssl.SSLContext,
    *,
    server_side: bool,
    hostname: str | None = None,
) -> Tls:
    """Run the handshake over ``transport``; the caller bounds it with its own timeout.

    Raises ssl.SSLError when the handshake fails (a certificate refused, no shared protocol,
    a peer that does not speak TLS), anyio.EndOfStream when the peer closes first, and
    anyio.BrokenResourceError when the connection breaks.
    """
    stream = await Tls.wrap(
        transport,
        server_side=server_side,
        hostname=hostname,
        ssl_context=context,
        standard_compatible=False,
    )
    assert isinstance(stream, Tls)
    return stream


def handshake_failure(exc: BaseException) -> str | None:
    """Words for a failed handshake, or None when ``exc`` is not a TLS failure (the peer
    reset or closed the connection: an ordinary transport end)."""
    seen: BaseException | None = exc
    for _ in range(3):  # anyio raises some failures as BrokenResourceError from the SSLError
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError) and not isinstance(seen, ssl.SSLSyscallError):
            words = seen.reason or str(seen)
            if isinstance(seen, ssl.SSLCertVerificationError) and seen.verify_message:
                words = f"{words}: {seen.verify_message}"
            return f"TLS handshake failed: {words}"
        seen = seen.__cause__
    return None


def check_server_context(context: object) -> ssl.SSLContext:
    """The context, if a server can use it; ConfigError (a ValueError) otherwise."""
    if not isinstance(context, ssl.SSLContext):
        raise ConfigError(f"ssl_context must be an ssl.SSLContext, got {context!r}")
    if context.protocol == ssl.PROTOCOL_TLS_CLIENT:
        raise ConfigError(
            "ssl_context is a client context (PROTOCOL_TLS_CLIENT); a server needs one made "
            "with ssl.create_default_context(ssl.Purpose.CLIENT_AUTH) or PROTOCOL_TLS_SERVER"
        )
    return context
