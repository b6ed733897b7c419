"""The streaming MQTT 3.1.1 decoder: bytes in, whole packets out, for one connection, with the
rules no single packet can check: part of the codec whose interface is
:mod:`device_gateway.mqtt_codec`.
"""

from __future__ import annotations

from typing import Final

from device_gateway.mqtt_packets import (
    _DISCONNECT,
    _PINGREQ,
    _PINGRESP,
    DEFAULT_MAX_REMAINING_LENGTH,
    PROTOCOL_MAX_REMAINING_LENGTH,
    MQTTProtocolError,
    Packet,
    PacketType,
    Puback,
    Role,
    Unsuback,
)
from device_gateway.mqtt_parsers import (
    _check_publish_flags,
    _parse_connack,
    _parse_connect,
    _parse_packet_id_only,
    _parse_publish,
    _parse_suback,
    _parse_subscribe,
    _parse_unsubscribe,
)
from keepconn import ConfigError

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

    # One decoder per connection: slots keep its fields in the object itself.
    __slots__ = (
        "_buf",
        "_disconnected",
        "_error",
        "_handshake_done",
        "_hello",
        "_max",
        "_pos",
        "_receivable",
        "_role",
    )

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
            raise self._failed()
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_packet(self) -> Packet | None:
        """Parse and return the next complete packet, or None until more bytes arrive."""
        if self._error is not None:
            raise self._failed()
        try:
            return self._next_packet()
        except MQTTProtocolError as exc:
            # Kept without the traceback, and never raised itself: an error raised here holds
            # this decoder's frames, and held by the decoder it would make a reference cycle,
            # garbage that only a full collection frees (or none, once the gateway has frozen
            # it with the survivors of a storm).
            self._error = MQTTProtocolError(exc.reason, connack_code=exc.connack_code)
            # The connection is finished; let go of whatever the peer made us hold.
            self._buf = bytearray()
            self._pos = 0
            raise

    def _failed(self) -> MQTTProtocolError:
        """What a call after the failure raises: a fresh copy of the error."""
        error = self._error
        assert error is not None
        return MQTTProtocolError(error.reason, connack_code=error.connack_code)

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
