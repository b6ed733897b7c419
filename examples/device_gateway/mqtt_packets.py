"""The MQTT 3.1.1 packets as plain records, with the limits, codes and topic rules that the
decoder and the encoder share: part of the codec whose interface is
:mod:`device_gateway.mqtt_codec`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Final, TypeAlias

import attrs

from keepconn import KeepconnError, ProtocolError

#: The largest value the four-byte variable-length encoding can carry (MQTT 2.2.3).
PROTOCOL_MAX_REMAINING_LENGTH: Final = 268_435_455
#: A device gateway's default ceiling: telemetry is small, and 256 KiB per connection bounds the
#: memory an attacker can pin with one slow connection.
DEFAULT_MAX_REMAINING_LENGTH: Final = 256 * 1024
#: The SUBACK return code that refuses one topic filter.
SUBACK_FAILURE: Final = 0x80

_MAX_STRING_BYTES: Final = 65_535


class PacketType(enum.IntEnum):
    """The control packet types of MQTT 3.1.1 (the high nibble of the first byte)."""

    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


class ConnackCode(enum.IntEnum):
    """CONNACK return codes (MQTT 3.2.2.3)."""

    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USERNAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


class Role(enum.Enum):
    """Which end of the connection a :class:`Decoder` sits on.

    The role decides which packets may arrive: a server decodes what clients send (CONNECT,
    SUBSCRIBE, PINGREQ, ...) and a client decodes what servers send (CONNACK, SUBACK, ...).
    """

    #: Decodes client-to-server packets; the first must be CONNECT.
    SERVER = "server"
    #: Decodes server-to-client packets; the first must be CONNACK.
    CLIENT = "client"


class MQTTProtocolError(ProtocolError):
    """The peer sent bytes that are not valid MQTT 3.1.1 (or use a feature this codec refuses).

    ``reason`` is a one-line explanation fit for a log. ``connack_code`` is set only for CONNECT
    problems that the spec answers with a CONNACK before closing (unacceptable protocol version,
    identifier rejected); otherwise the connection is closed without a reply.
    """

    def __init__(
        self,
        reason: str,
        *,
        connack_code: ConnackCode | None = None,
        frames: Iterable[Packet] = (),
    ) -> None:
        super().__init__(reason, frames=frames)
        self.reason = reason
        self.connack_code = connack_code


class MQTTEncodeError(KeepconnError, ValueError):
    """A packet handed to :func:`encode` cannot be put on the wire as it is (a caller bug)."""


# ----------------------------------------------------------------------------------------------
# Packets. Plain frozen records: the decoder validates what arrives and encode() validates what
# leaves, so the rules live in those two places rather than being split across constructors.


@attrs.frozen
class Will:
    """The message a server publishes on the client's behalf if it vanishes without DISCONNECT."""

    topic: str
    message: bytes
    qos: int = 0
    retain: bool = False


@attrs.frozen
class Connect:
    """CONNECT: the client's hello. ``password`` is binary data in MQTT 3.1.1, not a string."""

    client_id: str
    clean_session: bool = True
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    protocol_name: str = "MQTT"
    protocol_level: int = 4


@attrs.frozen
class Connack:
    """CONNACK: the server's answer to CONNECT. ``return_code`` is a :class:`ConnackCode` value."""

    session_present: bool = False
    return_code: int = ConnackCode.ACCEPTED


@attrs.frozen
class Publish:
    """PUBLISH: an application message. ``packet_id`` is ``None`` exactly when ``qos`` is 0."""

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None


@attrs.frozen
class Puback:
    """PUBACK: acknowledges a QoS 1 PUBLISH."""

    packet_id: int


def _topic_pairs(value: Iterable[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    return tuple((topic, qos) for topic, qos in value)


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _int_tuple(value: Iterable[int]) -> tuple[int, ...]:
    return tuple(value)


@attrs.frozen
class Subscribe:
    """SUBSCRIBE: ``topics`` pairs each topic filter with the maximum QoS the client asks for."""

    packet_id: int
    topics: tuple[tuple[str, int], ...] = attrs.field(converter=_topic_pairs)


@attrs.frozen
class Suback:
    """SUBACK: one return code per requested filter, in order: the granted QoS or 0x80."""

    packet_id: int
    return_codes: tuple[int, ...] = attrs.field(converter=_int_tuple)


@attrs.frozen
class Unsubscribe:
    """UNSUBSCRIBE: the topic filters to drop."""

    packet_id: int
    topic_filters: tuple[str, ...] = attrs.field(converter=_str_tuple)


@attrs.frozen
class Unsuback:
    """UNSUBACK: acknowledges an UNSUBSCRIBE."""

    packet_id: int


@attrs.frozen
class Pingreq:
    """PINGREQ: the client is alive (and asks whether the server is)."""


@attrs.frozen
class Pingresp:
    """PINGRESP: the server's answer to PINGREQ."""


@attrs.frozen
class Disconnect:
    """DISCONNECT: the client leaves cleanly, so its will must be discarded."""


#: Any packet this codec decodes or encodes.
Packet: TypeAlias = (
    Connect
    | Connack
    | Publish
    | Puback
    | Subscribe
    | Suback
    | Unsubscribe
    | Unsuback
    | Pingreq
    | Pingresp
    | Disconnect
)

# The bodiless packets carry no data, so one instance each serves every connection.
_PINGREQ: Final = Pingreq()
_PINGRESP: Final = Pingresp()
_DISCONNECT: Final = Disconnect()


# ----------------------------------------------------------------------------------------------
# Rules shared by the decoder and the encoder.


def _topic_name_problem(topic: str) -> str | None:
    """Why ``topic`` cannot be a topic name (PUBLISH, will), or None when it can."""
    if not topic:
        return "topic name is empty (MQTT-4.7.3-1)"
    if "+" in topic or "#" in topic:
        return f"topic name {topic!r} contains a wildcard (MQTT-3.3.2-2)"
    return None


def _topic_filter_problem(topic_filter: str) -> str | None:
    """Why ``topic_filter`` cannot be a topic filter (SUBSCRIBE, UNSUBSCRIBE), or None."""
    if not topic_filter:
        return "topic filter is empty (MQTT-4.7.3-1)"
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            return (
                f"topic filter {topic_filter!r}: '#' must be a whole level and the last one "
                "(MQTT-4.7.1-2)"
            )
        if "+" in level and level != "+":
            return f"topic filter {topic_filter!r}: '+' must be a whole level (MQTT-4.7.1-3)"
    return None
