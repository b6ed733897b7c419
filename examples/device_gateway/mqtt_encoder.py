"""Encoding MQTT 3.1.1 packets: records in, wire bytes out, each packet checked against the rules
before it leaves: part of the codec whose interface is :mod:`device_gateway.mqtt_codec`.
"""

from __future__ import annotations

from device_gateway.mqtt_packets import (
    _MAX_STRING_BYTES,
    PROTOCOL_MAX_REMAINING_LENGTH,
    SUBACK_FAILURE,
    Connack,
    ConnackCode,
    Connect,
    Disconnect,
    MQTTEncodeError,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    _topic_filter_problem,
    _topic_name_problem,
)


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
