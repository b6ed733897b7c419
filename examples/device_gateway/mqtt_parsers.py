"""Parsing one packet's body into its record, every shortfall and broken rule a protocol error:
part of the codec whose interface is :mod:`device_gateway.mqtt_codec` (the streaming
:class:`~device_gateway.mqtt_decoder.Decoder` calls these once a whole packet has arrived).
"""

from __future__ import annotations

from device_gateway.mqtt_packets import (
    SUBACK_FAILURE,
    Connack,
    ConnackCode,
    Connect,
    MQTTProtocolError,
    Publish,
    Suback,
    Subscribe,
    Unsubscribe,
    Will,
    _topic_filter_problem,
    _topic_name_problem,
)


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
