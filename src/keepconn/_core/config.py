"""The server's configuration records: what a hello yields, and the server's settings.

Both are frozen and validated when built, so a bad value fails at construction, naming the
field and the allowed range (DESIGN: an invalid configuration fails when it is built).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import attrs

from .admission import AdmissionConfig
from .errors import ConfigError
from .flapping import AddressFlappingConfig, FlappingConfig
from .gcpacing import GcPacing
from .heartbeat import ActiveHeartbeat, PingRateLimit
from .validate import number

__all__ = ["Hello", "ServerConfig"]


@attrs.frozen
class Hello:
    """What an identify callback returns for an authenticated peer.

    ``timeout`` overrides the server's idle timeout for this session (an MQTT gateway passes
    1.5 x the client's keepalive).
    """

    #: Who the peer is: the key of its session (a device id). A second authenticated hello
    #: with the same identity takes the session over.
    identity: Hashable
    #: This session's idle timeout in seconds (None: ``ServerConfig.idle_timeout``).
    timeout: float | None = attrs.field(default=None, validator=number(optional=True))
    #: Bytes sent once the session is open (an MQTT CONNACK 0, say). Sending the welcome here
    #: rather than inside identify means a peer is never welcomed and then refused.
    welcome: bytes | None = None
    #: Bytes sent if the server refuses the session after authentication (admission's session
    #: cap, a flapping ban, a duplicate identity), e.g. MQTT CONNACK 3 "server unavailable".
    refusal: bytes | None = None


@attrs.frozen
class ServerConfig:
    """Validated server settings; a bad value fails here, naming the field."""

    #: Seconds a session may stay silent (no complete frame) before it is reaped.
    idle_timeout: float = attrs.field(default=60.0, validator=number())
    #: Reaping granularity for every session, including those with a shorter timeout of their
    #: own. Defaults to min(0.25 s, idle_timeout / 10): a reaper wake-up with nothing due costs
    #: O(1), so waking four times a second is cheap and keeps short MQTT keepalives precise.
    resolution: float | None = attrs.field(default=None, validator=number(optional=True))
    #: Seconds a new connection has to complete its hello.
    hello_timeout: float = attrs.field(default=10.0, validator=number())
    #: Server pings (None: rely on the peer's own traffic and the idle timeout).
    heartbeat: ActiveHeartbeat | None = None
    #: Enforced limit on the peer's pings (None: not enforced).
    ping_rate: PingRateLimit | None = None
    #: A keepconn.tcp.TcpKeepalive applied to every accepted socket (None: leave the kernel's).
    keepalive: Any = None
    #: Most sessions one reap call may close, so the event loop never stalls on a mass expiry.
    reap_batch: int = attrs.field(default=1000, validator=number(integer=True))
    #: On shutdown: how long peers get to leave after being told, before they are aborted.
    shutdown_grace: float = attrs.field(default=5.0, validator=number(min_inclusive=True))
    #: The reconnect hint given to peers on shutdown, jittered by +/- shutdown_jitter.
    shutdown_retry_after: float = attrs.field(default=5.0, validator=number(min_inclusive=True))
    #: Relative spread (+/-) of the shutdown hint, so a fleet does not come back at once.
    shutdown_jitter: float = attrs.field(
        default=0.1, validator=number(min_inclusive=True, maximum=1.0)
    )
    #: Maximum connection age in seconds (closed with MAX_AGE, jittered by max_age_jitter).
    max_age: float | None = attrs.field(default=None, validator=number(optional=True))
    #: Relative spread (+/-) of max_age, so connections opened together do not all end together.
    max_age_jitter: float = attrs.field(
        default=0.1, validator=number(min_inclusive=True, maximum=1.0)
    )
    #: How timeouts (idle, heartbeat) close a peer that may still be alive behind a slow link:
    #: "abort" sends a RST at once; "graceful" sends FIN, keeps reading (and handing frames to
    #: the handler) for close_grace seconds so nothing in flight is lost, then aborts.
    timeout_close: str = attrs.field(
        default="abort", validator=attrs.validators.in_(("abort", "graceful"))
    )
    #: Seconds a "graceful" timeout close keeps reading after its FIN, before the abort.
    close_grace: float = attrs.field(default=2.0, validator=number())
    #: Admission control (None: admit everything). See AdmissionConfig for the defaults.
    admission: AdmissionConfig | None = attrs.field(factory=AdmissionConfig)
    #: Flapping detection (None: off).
    flapping: FlappingConfig | None = attrs.field(factory=FlappingConfig)
    #: Per-source-address detection of connections that never complete a hello (off by
    #: default: carrier-grade NAT puts thousands of devices behind one address).
    address_flapping: AddressFlappingConfig | None = None
    #: Hold the cyclic garbage collector's full collections while the server accepts a storm
    #: (None: leave the collector alone). Process-wide: see GcPacing.
    gc_pacing: GcPacing | None = None
    #: Bytes asked of the socket per receive.
    receive_size: int = attrs.field(default=65536, validator=number(integer=True))
    #: How connections are carried: "auto" serves plain TCP natively (lighter per idle
    #: connection): with an asyncio Protocol transport on asyncio and uvloop, on keepconn's own
    #: socket stream on trio; TLS stays on anyio streams. "anyio" always uses anyio streams.
    transport: str = attrs.field(default="auto", validator=attrs.validators.in_(("auto", "anyio")))

    @property
    def reap_resolution(self) -> float:
        """The resolution in force: :attr:`resolution`, or its default."""
        if self.resolution is not None:
            return self.resolution
        return min(0.25, self.idle_timeout / 10)

    def __attrs_post_init__(self) -> None:
        if self.resolution is not None and self.resolution > self.idle_timeout:
            raise ConfigError(
                f"resolution ({self.resolution}) must not exceed idle_timeout ({self.idle_timeout})"
            )
