"""A sans-I/O MQTT 3.1.1 codec: the part of the protocol a device gateway needs, strictly.

Nothing here touches a socket, a task or a clock. Bytes go in through :class:`Decoder` and packets
come out; packets go in through :func:`encode` and bytes come out. The gateway owns the socket and
decides what to do with each packet; the fleet simulator uses the same module from the client side
(``Decoder(Role.CLIENT)``).

Scope: CONNECT/CONNACK, PUBLISH at QoS 0 and 1 with PUBACK, SUBSCRIBE/SUBACK,
UNSUBSCRIBE/UNSUBACK, PINGREQ/PINGRESP and DISCONNECT.

QoS 2 is deliberately not supported. A device gateway stores telemetry idempotently and gains
nothing from the four-packet exactly-once handshake, while every in-flight QoS 2 message would be
per-connection state to keep, time out and clean up. So a PUBLISH at QoS 2 and the PUBREC, PUBREL
and PUBCOMP packets are rejected with a :class:`MQTTProtocolError` that says so. Two places where
QoS 2 is only *requested* stay legal, because the spec lets the server answer with less: a
SUBSCRIBE may ask for QoS 2 (the gateway grants at most 1 in its SUBACK) and a CONNECT may carry a
will at QoS 2 (the gateway publishes it at QoS 1 or 0).

Every malformed input raises :class:`MQTTProtocolError` with a ``reason`` naming the broken rule
(and its MQTT-x.y.z-n conformance number where the spec has one). The caller closes that one
connection; for CONNECT problems that the spec answers with a CONNACK, ``connack_code`` says which
return code to send first. Nothing a peer sends can make the decoder hold more than
``max_remaining_length + 5`` bytes after :meth:`Decoder.feed` returns: a declared length over the
maximum is refused as soon as the fixed header is complete, before any of the body is awaited.

Deliberately accepted, because the spec allows it and real devices do it: a remaining length in
more bytes than needed (``0x80 0x00`` for 0); control characters other than U+0000 in strings
(the spec says SHOULD NOT, not MUST NOT); client identifiers of any length and alphabet; an empty
client identifier with clean session set (the gateway may assign one, MQTT-3.1.3-6).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Final, TypeAlias

import attrs

from keepconn import ConfigError, KeepconnError, ProtocolError

__all__ = [
    "DEFAULT_MAX_REMAINING_LENGTH",
    "PROTOCOL_MAX_REMAINING_LENGTH",
    "SUBACK_FAILURE",
    "Connack",
    "ConnackCode",
    "Connect",
    "Decoder",
    "Disconnect",
    "MQTTEncodeError",
    "MQTTProtocolError",
    "Packet",
    "PacketType",
    "Pingreq",
    "Pingresp",
    "Puback",
    "Publish",
    "Role",
    "Suback",
    "Subscribe",
    "Unsuback",
    "Unsubscribe",
    "Will",
    "encode",
]

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


# ----------------------------------------------------------------------------------------------
# Decoding.

# Which packet types each role may receive. Anything else is a protocol error at the first byte,
# before its length is even read.
_RECEIVABLE: Final = {
    Role.SERVER: frozenset(
        {
            PacketType.CONNECT,
            PacketType.PUBLISH,
            PacketType.PUBACK,
            PacketType.PUBREC,
            PacketType.PUBREL,
            PacketType.PUBCOMP,
            PacketType.SUBSCRIBE,
            PacketType.UNSUBSCRIBE,
            PacketType.PINGREQ,
            PacketType.DISCONNECT,
        }
    ),
    Role.CLIENT: frozenset(
        {
            PacketType.CONNACK,
            PacketType.PUBLISH,
            PacketType.PUBACK,
            PacketType.PUBREC,
            PacketType.PUBREL,
            PacketType.PUBCOMP,
            PacketType.SUBACK,
            PacketType.UNSUBACK,
            PacketType.PINGRESP,
        }
    ),
}
_QOS2_FLOW: Final = frozenset({PacketType.PUBREC, PacketType.PUBREL, PacketType.PUBCOMP})
# MQTT 2.2.2: these three carry 0b0010 in the flag nibble; all others but PUBLISH carry 0.
_FLAGS_0010: Final = frozenset({PacketType.SUBSCRIBE, PacketType.UNSUBSCRIBE, PacketType.PUBREL})
# Packets whose body has one legal size: a wrong declared length is refused at the header, so a
# PINGREQ claiming 200 KiB never gets to make us wait for (or hold) 200 KiB.
_FIXED_LENGTH: Final = {
    PacketType.CONNACK: 2,
    PacketType.PUBACK: 2,
    PacketType.UNSUBACK: 2,
    PacketType.PINGREQ: 0,
    PacketType.PINGRESP: 0,
    PacketType.DISCONNECT: 0,
}
_HELLO: Final = {Role.SERVER: PacketType.CONNECT, Role.CLIENT: PacketType.CONNACK}


class _Reader:
    """A cursor over one packet's body that turns every shortfall into a protocol error."""

    __slots__ = ("_data", "_pos", "_packet")

    def __init__(self, data: bytes, packet: str) -> None:
        self._data = data
        self._pos = 0
        self._packet = packet

    def _take(self, count: int, what: str) -> bytes:
        end = self._pos + count
        if end > len(self._data):
            raise MQTTProtocolError(
                f"{self._packet}: {what} runs past the end of the packet "
                "(remaining length too short)"
            )
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u8(self, what: str) -> int:
        return self._take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self._take(2, what), "big")

    def binary(self, what: str) -> bytes:
        return self._take(self.u16(f"length of {what}"), what)

    def string(self, what: str) -> str:
        raw = self.binary(what)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            # Python's strict codec also refuses overlong forms and encoded surrogates, which is
            # exactly the set MQTT-1.5.3-1 calls ill-formed.
            raise MQTTProtocolError(
                f"{self._packet}: {what} is not well-formed UTF-8 (MQTT-1.5.3-1)"
            ) from None
        if "\x00" in text:
            raise MQTTProtocolError(f"{self._packet}: {what} contains U+0000 (MQTT-1.5.3-2)")
        return text

    def packet_id(self) -> int:
        packet_id = self.u16("packet identifier")
        if packet_id == 0:
            raise MQTTProtocolError(
                f"{self._packet}: packet identifier 0 is invalid (MQTT-2.3.1-1)"
            )
        return packet_id

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def rest(self) -> bytes:
        return self._take(self.remaining, "payload")

    def finish(self) -> None:
        if self._pos != len(self._data):
            raise MQTTProtocolError(
                f"{self._packet}: {len(self._data) - self._pos} unexpected bytes after the last "
                "field (remaining length too long)"
            )


def _parse_connect(body: bytes) -> Connect:
    r = _Reader(body, "CONNECT")
    name = r.string("protocol name")
    level = r.u8("protocol level")
    # Name and level come before everything else: a newer client (MQTT 5 adds properties after
    # the keepalive) must get CONNACK 1 rather than a parse error on fields we do not know.
    if name == "MQIsdp":
        raise MQTTProtocolError(
            "CONNECT: protocol 'MQIsdp' (MQTT 3.1) is not supported; this server speaks MQTT 3.1.1",
            connack_code=ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION,
        )
    if name != "MQTT":
        raise MQTTProtocolError(f"CONNECT: protocol name {name!r} is not 'MQTT' (MQTT-3.1.2-1)")
    if level != 4:
        raise MQTTProtocolError(
            f"CONNECT: protocol level {level} is not 4 (MQTT 3.1.1): unacceptable protocol "
            "version (MQTT-3.1.2-2)",
            connack_code=ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION,
        )
    flags = r.u8("connect flags")
    if flags & 0x01:
        raise MQTTProtocolError("CONNECT: reserved connect flag (bit 0) is set (MQTT-3.1.2-3)")
    clean_session = bool(flags & 0x02)
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    password_flag = bool(flags & 0x40)
    username_flag = bool(flags & 0x80)
    if will_flag:
        if will_qos == 3:
            raise MQTTProtocolError("CONNECT: will QoS 3 is invalid (MQTT-3.1.2-14)")
    elif will_qos or will_retain:
        raise MQTTProtocolError(
            "CONNECT: will QoS or will retain set without the will flag (MQTT-3.1.2-13, -15)"
        )
    if password_flag and not username_flag:
        raise MQTTProtocolError("CONNECT: password flag set without username flag (MQTT-3.1.2-22)")
    keepalive = r.u16("keepalive")
    client_id = r.string("client identifier")
    will = None
    if will_flag:
        will_topic = r.string("will topic")
        problem = _topic_name_problem(will_topic)
        if problem is not None:
            raise MQTTProtocolError(f"CONNECT: will {problem}")
        will = Will(will_topic, r.binary("will message"), will_qos, will_retain)
    username = r.string("username") if username_flag else None
    password = r.binary("password") if password_flag else None
    r.finish()
    # Checked last so that only an otherwise well-formed CONNECT earns a CONNACK.
    if not client_id and not clean_session:
        raise MQTTProtocolError(
            "CONNECT: empty client identifier requires clean session = 1; identifier rejected "
            "(MQTT-3.1.3-8)",
            connack_code=ConnackCode.IDENTIFIER_REJECTED,
        )
    return Connect(
        client_id=client_id,
        clean_session=clean_session,
        keepalive=keepalive,
        username=username,
        password=password,
        will=will,
        protocol_name=name,
        protocol_level=level,
    )


def _parse_connack(body: bytes) -> Connack:
    ack_flags, code = body[0], body[1]
    if ack_flags & 0xFE:
        raise MQTTProtocolError("CONNACK: reserved acknowledge flags (bits 7-1) are set")
    if code > ConnackCode.NOT_AUTHORIZED:
        raise MQTTProtocolError(f"CONNACK: return code {code} is reserved")
    session_present = bool(ack_flags & 0x01)
    if session_present and code != ConnackCode.ACCEPTED:
        raise MQTTProtocolError(
            "CONNACK: session present set with a non-zero return code (MQTT-3.2.2-4)"
        )
    return Connack(session_present, ConnackCode(code))


def _parse_publish(flags: int, body: bytes) -> Publish:
    # The flags were vetted by _check_publish_flags when the first byte arrived.
    dup = bool(flags & 0x08)
    qos = (flags >> 1) & 0x03
    retain = bool(flags & 0x01)
    r = _Reader(body, "PUBLISH")
    topic = r.string("topic name")
    problem = _topic_name_problem(topic)
    if problem is not None:
        raise MQTTProtocolError(f"PUBLISH: {problem}")
    packet_id = r.packet_id() if qos else None
    return Publish(topic, r.rest(), qos, retain, dup, packet_id)


def _check_publish_flags(flags: int) -> None:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise MQTTProtocolError("PUBLISH: QoS 3 is invalid (MQTT-3.3.1-4)")
    if qos == 2:
        raise MQTTProtocolError("PUBLISH: QoS 2 is not supported by this gateway (use QoS 0 or 1)")
    if flags & 0x08 and qos == 0:
        raise MQTTProtocolError("PUBLISH: DUP flag set on a QoS 0 message (MQTT-3.3.1-2)")


def _parse_subscribe(body: bytes) -> Subscribe:
    r = _Reader(body, "SUBSCRIBE")
    packet_id = r.packet_id()
    if not r.remaining:
        raise MQTTProtocolError("SUBSCRIBE: no topic filters in the payload (MQTT-3.8.3-3)")
    topics = []
    while r.remaining:
        topic_filter = r.string("topic filter")
        problem = _topic_filter_problem(topic_filter)
        if problem is not None:
            raise MQTTProtocolError(f"SUBSCRIBE: {problem}")
        requested = r.u8("requested QoS")
        if requested > 2:
            raise MQTTProtocolError(
                f"SUBSCRIBE: requested QoS byte {requested:#04x} is invalid (MQTT-3.8.3-4)"
            )
        topics.append((topic_filter, requested))
    return Subscribe(packet_id, topics)


def _parse_suback(body: bytes) -> Suback:
    r = _Reader(body, "SUBACK")
    packet_id = r.packet_id()
    if not r.remaining:
        raise MQTTProtocolError("SUBACK: no return codes")
    codes = r.rest()
    for code in codes:
        if code not in (0, 1, 2, SUBACK_FAILURE):
            raise MQTTProtocolError(f"SUBACK: return code {code:#04x} is reserved (MQTT-3.9.3-2)")
    return Suback(packet_id, codes)


def _parse_unsubscribe(body: bytes) -> Unsubscribe:
    r = _Reader(body, "UNSUBSCRIBE")
    packet_id = r.packet_id()
    if not r.remaining:
        raise MQTTProtocolError("UNSUBSCRIBE: no topic filters in the payload (MQTT-3.10.3-2)")
    filters = []
    while r.remaining:
        topic_filter = r.string("topic filter")
        problem = _topic_filter_problem(topic_filter)
        if problem is not None:
            raise MQTTProtocolError(f"UNSUBSCRIBE: {problem}")
        filters.append(topic_filter)
    return Unsubscribe(packet_id, filters)


def _parse_packet_id_only(name: str, body: bytes) -> int:
    return _Reader(body, name).packet_id()


class Decoder:
    """Incremental decoder for one connection: bytes in, whole packets out, partial frames kept.

    It also tracks the connection-level rules that no single packet can check: the first packet
    must be CONNECT (``Role.SERVER``) or CONNACK (``Role.CLIENT``), only one may ever arrive, and
    nothing may follow a DISCONNECT.

    Use :meth:`feed` for the common case, or :meth:`receive_data` plus :meth:`next_packet` to act
    on each packet before the next is parsed (so the packets before a malformed one are not lost
    with the exception). After a :class:`MQTTProtocolError` the decoder stays failed: every later
    call raises the same error, because the byte stream has no resynchronisation point.
    """

    def __init__(
        self,
        role: Role = Role.SERVER,
        *,
        max_remaining_length: int = DEFAULT_MAX_REMAINING_LENGTH,
    ) -> None:
        if not isinstance(role, Role):
            raise ConfigError(f"role must be a Role, got {role!r}")
        if not 0 <= max_remaining_length <= PROTOCOL_MAX_REMAINING_LENGTH:
            raise ConfigError(
                "max_remaining_length must be between 0 and "
                f"{PROTOCOL_MAX_REMAINING_LENGTH}, got {max_remaining_length}"
            )
        self._role = role
        self._max = max_remaining_length
        self._receivable = _RECEIVABLE[role]
        self._hello = _HELLO[role]
        self._buf = bytearray()
        # Start of unparsed data in _buf: consumed packets are dropped in one slice per
        # receive_data call rather than one per packet, which would be quadratic.
        self._pos = 0
        self._handshake_done = False
        self._disconnected = False
        self._error: MQTTProtocolError | None = None

    @property
    def role(self) -> Role:
        """Which end of the connection this decoder serves."""
        return self._role

    @property
    def max_remaining_length(self) -> int:
        """The largest remaining length accepted in a fixed header."""
        return self._max

    @property
    def handshake_done(self) -> bool:
        """True once the CONNECT (server role) or CONNACK (client role) has been decoded."""
        return self._handshake_done

    @property
    def disconnected(self) -> bool:
        """True once a DISCONNECT has been decoded; any further packet is an error."""
        return self._disconnected

    @property
    def buffered(self) -> int:
        """How many received bytes are held, waiting to complete a packet."""
        return len(self._buf) - self._pos

    @property
    def error(self) -> MQTTProtocolError | None:
        """The error that failed this decoder, if any."""
        return self._error

    def feed(self, data: bytes) -> list[Packet]:
        """Add ``data`` and return every packet it completes, in order (often none).

        When a malformed packet follows valid ones in ``data``, the error raised carries those
        packets as its ``frames`` (keepconn's framer contract: nothing sent correctly is lost).
        """
        self.receive_data(data)
        packets: list[Packet] = []
        try:
            while (packet := self.next_packet()) is not None:
                packets.append(packet)
        except MQTTProtocolError as exc:
            if not packets:
                raise
            # A copy for this call alone: the decoder keeps the bare error for later calls,
            # which must not hand these packets over a second time.
            raise MQTTProtocolError(
                exc.reason, connack_code=exc.connack_code, frames=packets
            ) from exc
        return packets

    def receive_data(self, data: bytes) -> None:
        """Add ``data`` to the buffer without parsing it; call :meth:`next_packet` next.

        Call :meth:`next_packet` until it returns None before receiving more: the size bound
        holds only for bytes that have been offered to the parser.
        """
        if self._error is not None:
            raise self._error
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_packet(self) -> Packet | None:
        """Parse and return the next complete packet, or None until more bytes arrive."""
        if self._error is not None:
            raise self._error
        try:
            return self._next_packet()
        except MQTTProtocolError as exc:
            self._error = exc
            # The connection is finished; let go of whatever the peer made us hold.
            self._buf = bytearray()
            self._pos = 0
            raise

    def _next_packet(self) -> Packet | None:
        buf = self._buf
        start = self._pos
        available = len(buf) - start
        if not available:
            return None
        first = buf[start]
        ptype_value, flags = first >> 4, first & 0x0F
        ptype = self._check_first_byte(ptype_value, flags)

        # Remaining length: 7 bits a byte, least significant first, at most 4 bytes (MQTT 2.2.3).
        length = 0
        shift = 0
        index = 1
        while True:
            if index >= available:
                return None
            byte = buf[start + index]
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            if index == 4:
                raise MQTTProtocolError(
                    "remaining length is encoded in more than 4 bytes (MQTT 2.2.3)"
                )
            shift += 7
            index += 1
        header_size = index + 1

        expected = _FIXED_LENGTH.get(ptype)
        if expected is not None and length != expected:
            raise MQTTProtocolError(f"{ptype.name}: remaining length {length}, must be {expected}")
        if length > self._max:
            raise MQTTProtocolError(
                f"{ptype.name}: declared remaining length {length} exceeds the maximum {self._max}"
            )
        end = start + header_size + length
        if end > len(buf):
            return None
        body = bytes(buf[start + header_size : end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
        return self._parse(ptype, flags, body)

    def _check_first_byte(self, ptype_value: int, flags: int) -> PacketType:
        """Everything the first byte alone can refuse, refused before the length is read."""
        if ptype_value in (0, 15):
            raise MQTTProtocolError(f"packet type {ptype_value} is reserved")
        ptype = PacketType(ptype_value)
        if ptype not in self._receivable:
            sender = "server" if self._role is Role.SERVER else "client"
            raise MQTTProtocolError(
                f"{ptype.name} must never be sent to a {sender}; it flows the other way"
            )
        if self._disconnected:
            raise MQTTProtocolError(f"{ptype.name} after DISCONNECT (MQTT-3.14.4-1)")
        if not self._handshake_done:
            if ptype is not self._hello:
                rule = "MQTT-3.1.0-1" if self._role is Role.SERVER else "MQTT-3.2.0-1"
                raise MQTTProtocolError(
                    f"first packet must be {self._hello.name}, got {ptype.name} ({rule})"
                )
        elif ptype is self._hello:
            rule = " (MQTT-3.1.0-2)" if self._role is Role.SERVER else ""
            raise MQTTProtocolError(f"second {ptype.name} on one connection{rule}")
        if ptype in _QOS2_FLOW:
            raise MQTTProtocolError(
                f"{ptype.name} belongs to the QoS 2 flow, which this gateway does not support"
            )
        if ptype is PacketType.PUBLISH:
            _check_publish_flags(flags)
        else:
            required = 0b0010 if ptype in _FLAGS_0010 else 0
            if flags != required:
                raise MQTTProtocolError(
                    f"{ptype.name}: reserved fixed-header flags are {flags:#06b}, must be "
                    f"{required:#06b} (MQTT-2.2.2-1)"
                )
        return ptype

    def _parse(self, ptype: PacketType, flags: int, body: bytes) -> Packet:
        packet: Packet
        if ptype is PacketType.PUBLISH:
            packet = _parse_publish(flags, body)
        elif ptype is PacketType.PUBACK:
            packet = Puback(_parse_packet_id_only("PUBACK", body))
        elif ptype is PacketType.PINGREQ:
            packet = _PINGREQ
        elif ptype is PacketType.PINGRESP:
            packet = _PINGRESP
        elif ptype is PacketType.SUBSCRIBE:
            packet = _parse_subscribe(body)
        elif ptype is PacketType.SUBACK:
            packet = _parse_suback(body)
        elif ptype is PacketType.UNSUBSCRIBE:
            packet = _parse_unsubscribe(body)
        elif ptype is PacketType.UNSUBACK:
            packet = Unsuback(_parse_packet_id_only("UNSUBACK", body))
        elif ptype is PacketType.CONNECT:
            packet = _parse_connect(body)
            self._handshake_done = True
        elif ptype is PacketType.CONNACK:
            packet = _parse_connack(body)
            self._handshake_done = True
        elif ptype is PacketType.DISCONNECT:
            packet = _DISCONNECT
            self._disconnected = True
        else:  # pragma: no cover - _check_first_byte admits only the types above
            raise AssertionError(f"unhandled packet type {ptype!r}")
        return packet


# ----------------------------------------------------------------------------------------------
# Encoding.


def _fail(packet: str, problem: str) -> MQTTEncodeError:
    return MQTTEncodeError(f"cannot encode {packet}: {problem}")


def _enc_binary(data: bytes, packet: str, what: str) -> bytes:
    if len(data) > _MAX_STRING_BYTES:
        raise _fail(packet, f"{what} is {len(data)} bytes, more than {_MAX_STRING_BYTES}")
    return len(data).to_bytes(2, "big") + data


def _enc_string(text: str, packet: str, what: str) -> bytes:
    if "\x00" in text:
        raise _fail(packet, f"{what} contains U+0000")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(packet, f"{what} contains a lone surrogate") from None
    return _enc_binary(raw, packet, what)


def _enc_packet_id(packet_id: int, packet: str) -> bytes:
    if not 1 <= packet_id <= 0xFFFF:
        raise _fail(packet, f"packet identifier {packet_id} is outside 1..65535")
    return packet_id.to_bytes(2, "big")


def _frame(first_byte: int, body: bytes) -> bytes:
    length = len(body)
    if length > PROTOCOL_MAX_REMAINING_LENGTH:
        raise MQTTEncodeError(
            f"cannot encode packet: body of {length} bytes exceeds {PROTOCOL_MAX_REMAINING_LENGTH}"
        )
    header = bytearray((first_byte,))
    while True:
        byte = length & 0x7F
        length >>= 7
        if length:
            header.append(byte | 0x80)
        else:
            header.append(byte)
            break
    return bytes(header) + body


def _check_qos(qos: int, packet: str, what: str, allowed: range) -> None:
    if qos not in allowed:
        raise _fail(packet, f"{what} {qos} is outside {allowed.start}..{allowed.stop - 1}")


def _encode_connect(p: Connect) -> bytes:
    if not 0 <= p.protocol_level <= 0xFF:
        raise _fail("CONNECT", f"protocol level {p.protocol_level} does not fit a byte")
    if not 0 <= p.keepalive <= 0xFFFF:
        raise _fail("CONNECT", f"keepalive {p.keepalive} is outside 0..65535")
    if p.password is not None and p.username is None:
        raise _fail("CONNECT", "a password needs a username in MQTT 3.1.1")
    flags = 0x02 if p.clean_session else 0
    payload = [_enc_string(p.client_id, "CONNECT", "client identifier")]
    if p.will is not None:
        _check_qos(p.will.qos, "CONNECT", "will QoS", range(3))
        problem = _topic_name_problem(p.will.topic)
        if problem is not None:
            raise _fail("CONNECT", f"will {problem}")
        flags |= 0x04 | (p.will.qos << 3) | (0x20 if p.will.retain else 0)
        payload.append(_enc_string(p.will.topic, "CONNECT", "will topic"))
        payload.append(_enc_binary(p.will.message, "CONNECT", "will message"))
    if p.username is not None:
        flags |= 0x80
        payload.append(_enc_string(p.username, "CONNECT", "username"))
    if p.password is not None:
        flags |= 0x40
        payload.append(_enc_binary(p.password, "CONNECT", "password"))
    header = (
        _enc_string(p.protocol_name, "CONNECT", "protocol name")
        + bytes((p.protocol_level, flags))
        + p.keepalive.to_bytes(2, "big")
    )
    return _frame(PacketType.CONNECT << 4, header + b"".join(payload))


def _encode_connack(p: Connack) -> bytes:
    if not 0 <= p.return_code <= ConnackCode.NOT_AUTHORIZED:
        raise _fail("CONNACK", f"return code {p.return_code} is reserved")
    if p.session_present and p.return_code != ConnackCode.ACCEPTED:
        raise _fail("CONNACK", "session present must be 0 with a non-zero return code")
    return bytes((PacketType.CONNACK << 4, 2, int(p.session_present), p.return_code))


def _encode_publish(p: Publish) -> bytes:
    _check_qos(p.qos, "PUBLISH", "QoS", range(2))
    problem = _topic_name_problem(p.topic)
    if problem is not None:
        raise _fail("PUBLISH", problem)
    body = _enc_string(p.topic, "PUBLISH", "topic name")
    if p.qos:
        if p.packet_id is None:
            raise _fail("PUBLISH", "QoS 1 needs a packet identifier")
        body += _enc_packet_id(p.packet_id, "PUBLISH")
    else:
        if p.packet_id is not None:
            raise _fail("PUBLISH", "QoS 0 must not carry a packet identifier")
        if p.dup:
            raise _fail("PUBLISH", "DUP must be 0 at QoS 0")
    first = (PacketType.PUBLISH << 4) | (0x08 if p.dup else 0) | (p.qos << 1) | int(p.retain)
    return _frame(first, body + p.payload)


def _encode_subscribe(p: Subscribe) -> bytes:
    if not p.topics:
        raise _fail("SUBSCRIBE", "no topic filters")
    body = [_enc_packet_id(p.packet_id, "SUBSCRIBE")]
    for topic_filter, qos in p.topics:
        problem = _topic_filter_problem(topic_filter)
        if problem is not None:
            raise _fail("SUBSCRIBE", problem)
        _check_qos(qos, "SUBSCRIBE", "requested QoS", range(3))
        body.append(_enc_string(topic_filter, "SUBSCRIBE", "topic filter") + bytes((qos,)))
    return _frame((PacketType.SUBSCRIBE << 4) | 0b0010, b"".join(body))


def _encode_suback(p: Suback) -> bytes:
    if not p.return_codes:
        raise _fail("SUBACK", "no return codes")
    for code in p.return_codes:
        if code not in (0, 1, 2, SUBACK_FAILURE):
            raise _fail("SUBACK", f"return code {code} is reserved")
    body = _enc_packet_id(p.packet_id, "SUBACK") + bytes(p.return_codes)
    return _frame(PacketType.SUBACK << 4, body)


def _encode_unsubscribe(p: Unsubscribe) -> bytes:
    if not p.topic_filters:
        raise _fail("UNSUBSCRIBE", "no topic filters")
    body = [_enc_packet_id(p.packet_id, "UNSUBSCRIBE")]
    for topic_filter in p.topic_filters:
        problem = _topic_filter_problem(topic_filter)
        if problem is not None:
            raise _fail("UNSUBSCRIBE", problem)
        body.append(_enc_string(topic_filter, "UNSUBSCRIBE", "topic filter"))
    return _frame((PacketType.UNSUBSCRIBE << 4) | 0b0010, b"".join(body))


def _encode_id_only(ptype: PacketType, packet_id: int) -> bytes:
    return bytes((ptype << 4, 2)) + _enc_packet_id(packet_id, ptype.name)


def encode(packet: Packet) -> bytes:
    """Return the wire bytes of ``packet``; raise :class:`MQTTEncodeError` if it is invalid.

    Works for both directions: the gateway encodes CONNACK, PUBLISH, PUBACK, SUBACK, UNSUBACK and
    PINGRESP; a client (the fleet simulator) encodes CONNECT, PUBLISH, PUBACK, SUBSCRIBE,
    UNSUBSCRIBE, PINGREQ and DISCONNECT. The remaining length always uses the fewest bytes.
    """
    if isinstance(packet, Publish):
        return _encode_publish(packet)
    if isinstance(packet, Puback):
        return _encode_id_only(PacketType.PUBACK, packet.packet_id)
    if isinstance(packet, Pingreq):
        return bytes((PacketType.PINGREQ << 4, 0))
    if isinstance(packet, Pingresp):
        return bytes((PacketType.PINGRESP << 4, 0))
    if isinstance(packet, Connect):
        return _encode_connect(packet)
    if isinstance(packet, Connack):
        return _encode_connack(packet)
    if isinstance(packet, Subscribe):
        return _encode_subscribe(packet)
    if isinstance(packet, Suback):
        return _encode_suback(packet)
    if isinstance(packet, Unsubscribe):
        return _encode_unsubscribe(packet)
    if isinstance(packet, Unsuback):
        return _encode_id_only(PacketType.UNSUBACK, packet.packet_id)
    if isinstance(packet, Disconnect):
        return bytes((PacketType.DISCONNECT << 4, 0))
    raise MQTTEncodeError(f"cannot encode {packet!r}: not an MQTT packet")
