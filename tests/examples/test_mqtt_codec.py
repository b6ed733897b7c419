"""The example gateway's sans-I/O MQTT 3.1.1 codec: round trips, every malformed case, fuzzing,
and interoperability with a real client (paho-mqtt) that nobody here wrote."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_gateway import mqtt_codec as mq
from keepconn import ConfigError, ProtocolError

PACKET_TYPES = (
    mq.Connect,
    mq.Connack,
    mq.Publish,
    mq.Puback,
    mq.Subscribe,
    mq.Suback,
    mq.Unsubscribe,
    mq.Unsuback,
    mq.Pingreq,
    mq.Pingresp,
    mq.Disconnect,
)


# ----------------------------------------------------------------------------------------------
# Helpers. Malformed frames are built here by hand, not with the codec's encoder, so that a bug
# in the encoder cannot hide the same bug in the decoder.


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return len(raw).to_bytes(2, "big") + raw


def connect_body(
    *,
    name: bytes = s("MQTT"),
    level: int = 4,
    flags: int = 0x02,
    keepalive: int = 60,
    payload: bytes = s("dev-1"),
) -> bytes:
    return name + bytes((level, flags)) + keepalive.to_bytes(2, "big") + payload


CONNECT = frame(0x10, connect_body())
CONNACK = bytes((0x20, 2, 0, 0))


def server() -> mq.Decoder:
    """A server-side decoder that has already seen a valid CONNECT."""
    decoder = mq.Decoder(mq.Role.SERVER)
    assert decoder.feed(CONNECT) == [mq.Connect("dev-1")]
    return decoder


def client() -> mq.Decoder:
    """A client-side decoder that has already seen a CONNACK."""
    decoder = mq.Decoder(mq.Role.CLIENT)
    assert decoder.feed(CONNACK) == [mq.Connack()]
    return decoder


def reject(decoder: mq.Decoder, data: bytes, reason: str) -> mq.MQTTProtocolError:
    with pytest.raises(mq.MQTTProtocolError) as info:
        decoder.feed(data)
    assert reason in info.value.reason, info.value.reason
    return info.value


# ----------------------------------------------------------------------------------------------
# Round trips and known bytes.

CLIENT_PACKETS = [
    mq.Connect("dev-1"),
    mq.Connect(
        "sensor-42",
        clean_session=False,
        keepalive=0,
        username="alice",
        password=b"\x00\xffbinary",
        will=mq.Will("devices/sensor-42/status", b"offline", qos=1, retain=True),
    ),
    mq.Connect("", clean_session=True, username="u"),
    mq.Connect("ü-设备-🙂", will=mq.Will("w", b"", qos=2)),
]
SESSION_PACKETS_FROM_CLIENT = [
    mq.Publish("devices/1/telemetry", b"21.5"),
    mq.Publish("t", b"", qos=1, packet_id=1),
    mq.Publish("$SYS/x", b"\x00" * 300, qos=1, retain=True, dup=True, packet_id=65535),
    mq.Puback(7),
    mq.Subscribe(1, [("devices/1/commands", 1)]),
    mq.Subscribe(2, [("a/+/c", 0), ("#", 2), ("+", 1), ("a/#", 0), ("/", 0)]),
    mq.Unsubscribe(3, ["a/b", "x/#"]),
    mq.Pingreq(),
    mq.Disconnect(),
]
PACKETS_FROM_SERVER = [
    mq.Connack(),
    mq.Connack(session_present=True),
    mq.Connack(return_code=mq.ConnackCode.BAD_USERNAME_OR_PASSWORD),
    mq.Publish("devices/1/commands", b"reboot", qos=1, packet_id=9),
    mq.Puback(1),
    mq.Suback(1, [0, 1, 2, mq.SUBACK_FAILURE]),
    mq.Unsuback(3),
    mq.Pingresp(),
]


@pytest.mark.parametrize("packet", CLIENT_PACKETS, ids=repr)
def test_connect_round_trip(packet: mq.Connect) -> None:
    decoder = mq.Decoder()
    assert decoder.feed(mq.encode(packet)) == [packet]
    assert decoder.handshake_done


@pytest.mark.parametrize("packet", SESSION_PACKETS_FROM_CLIENT, ids=repr)
def test_client_packet_round_trip(packet: mq.Packet) -> None:
    assert server().feed(mq.encode(packet)) == [packet]


@pytest.mark.parametrize("packet", PACKETS_FROM_SERVER, ids=repr)
def test_server_packet_round_trip(packet: mq.Packet) -> None:
    decoder = mq.Decoder(mq.Role.CLIENT)
    if not isinstance(packet, mq.Connack):
        decoder.feed(CONNACK)
    assert decoder.feed(mq.encode(packet)) == [packet]


def test_known_bytes() -> None:
    # Byte layouts written out from the spec's figures, independent of the encoder.
    assert mq.encode(mq.Pingreq()) == b"\xc0\x00"
    assert mq.encode(mq.Pingresp()) == b"\xd0\x00"
    assert mq.encode(mq.Disconnect()) == b"\xe0\x00"
    assert mq.encode(mq.Puback(0x1234)) == b"\x40\x02\x12\x34"
    assert mq.encode(mq.Unsuback(5)) == b"\xb0\x02\x00\x05"
    assert mq.encode(mq.Connack(True, 0)) == b"\x20\x02\x01\x00"
    assert mq.encode(mq.Connack(False, 5)) == b"\x20\x02\x00\x05"
    assert mq.encode(mq.Publish("a/b", b"hi", qos=1, retain=True, packet_id=10)) == (
        b"\x33\x09\x00\x03a/b\x00\x0ahi"
    )
    assert mq.encode(mq.Subscribe(10, [("a/b", 1)])) == b"\x82\x08\x00\x0a\x00\x03a/b\x01"
    assert mq.encode(mq.Unsubscribe(10, ["a/b"])) == b"\xa2\x07\x00\x0a\x00\x03a/b"
    assert mq.encode(mq.Suback(10, [1, 0x80])) == b"\x90\x04\x00\x0a\x01\x80"
    # The spec's CONNECT example (3.1.2.10): flags 0xCE = user, password, will QoS 1, clean.
    connect = mq.Connect(
        "c", keepalive=10, username="u", password=b"p", will=mq.Will("w", b"m", qos=1)
    )
    assert mq.encode(connect) == frame(
        0x10,
        s("MQTT") + b"\x04\xce\x00\x0a" + s("c") + s("w") + s("m") + s("u") + s("p"),
    )


@pytest.mark.parametrize(
    ("body_size", "length_bytes"),
    [(0, 1), (127, 1), (128, 2), (16_383, 2), (16_384, 3), (2_097_151, 3), (2_097_152, 4)],
)
def test_remaining_length_boundaries(body_size: int, length_bytes: int) -> None:
    # A body of 0 is a PINGREQ; otherwise a PUBLISH to "t" (3 bytes with its length prefix).
    packet: mq.Packet = mq.Pingreq() if body_size == 0 else mq.Publish("t", b"x" * (body_size - 3))
    data = mq.encode(packet)
    assert len(data) == 1 + length_bytes + body_size
    assert data[1 : 1 + length_bytes] == varint(body_size)
    # The limit is exactly this body (but room for the CONNECT): the boundary is inclusive.
    decoder = mq.Decoder(max_remaining_length=max(body_size, len(CONNECT)))
    decoder.feed(CONNECT)
    assert decoder.feed(data) == [packet]


def test_several_packets_in_one_chunk_and_partial_tail() -> None:
    packets = SESSION_PACKETS_FROM_CLIENT[:-1]
    stream = b"".join(mq.encode(p) for p in packets)
    decoder = mq.Decoder()
    tail = mq.encode(mq.Publish("x", b"12345"))
    assert decoder.feed(CONNECT + stream + tail[:4]) == [mq.Connect("dev-1"), *packets]
    assert decoder.buffered == 4
    assert decoder.feed(tail[4:]) == [mq.Publish("x", b"12345")]
    assert decoder.buffered == 0


@pytest.mark.parametrize("packet", CLIENT_PACKETS[1:2] + SESSION_PACKETS_FROM_CLIENT, ids=repr)
def test_byte_by_byte_yields_nothing_until_complete(packet: mq.Packet) -> None:
    decoder = mq.Decoder() if isinstance(packet, mq.Connect) else server()
    data = mq.encode(packet)
    for index in range(len(data) - 1):
        assert decoder.feed(data[index : index + 1]) == []
        assert decoder.buffered == index + 1
    assert decoder.feed(data[-1:]) == [packet]
    assert decoder.buffered == 0


def test_next_packet_keeps_packets_before_a_malformed_one() -> None:
    decoder = server()
    decoder.receive_data(mq.encode(mq.Publish("a", b"1")) + b"\xc1\x00")
    assert decoder.next_packet() == mq.Publish("a", b"1")
    with pytest.raises(mq.MQTTProtocolError, match="reserved fixed-header flags"):
        decoder.next_packet()


def test_decoder_stays_failed_and_lets_go_of_its_buffer() -> None:
    decoder = server()
    error = reject(decoder, b"\x00\x00", "packet type 0 is reserved")
    kept = decoder.error
    assert kept is not None and kept.reason == error.reason
    # Kept without a traceback: one would hold the decoder's own frames, a reference cycle.
    assert kept.__traceback__ is None
    assert decoder.buffered == 0
    with pytest.raises(mq.MQTTProtocolError) as again:
        decoder.feed(mq.encode(mq.Pingreq()))
    # The same error, raised as a fresh copy (raising the kept one would give it a traceback).
    assert again.value.reason == error.reason and again.value is not kept
    assert kept.__traceback__ is None
    with pytest.raises(mq.MQTTProtocolError):
        decoder.next_packet()


def test_error_is_a_keepconn_protocol_error() -> None:
    assert issubclass(mq.MQTTProtocolError, ProtocolError)
    error = reject(mq.Decoder(), b"\xc0\x00", "first packet must be CONNECT")
    assert error.connack_code is None
    assert str(error) == error.reason


@pytest.mark.parametrize("bad", [-1, mq.PROTOCOL_MAX_REMAINING_LENGTH + 1])
def test_decoder_config_is_validated(bad: int) -> None:
    with pytest.raises(ConfigError, match="max_remaining_length"):
        mq.Decoder(max_remaining_length=bad)
    with pytest.raises(ConfigError, match="role"):
        mq.Decoder("server")  # type: ignore[arg-type]


def test_state_properties() -> None:
    decoder = mq.Decoder(max_remaining_length=100)
    assert decoder.role is mq.Role.SERVER
    assert decoder.max_remaining_length == 100
    assert not decoder.handshake_done and not decoder.disconnected
    decoder.feed(CONNECT)
    assert decoder.handshake_done
    decoder.feed(b"\xe0\x00")
    assert decoder.disconnected


# ----------------------------------------------------------------------------------------------
# Malformed input: each case with the reason it must give.

UTF8_BAD = [
    pytest.param(b"\xff", id="invalid-byte"),
    pytest.param(b"\xc0\x80", id="overlong-nul"),
    pytest.param(b"\xed\xa0\x80", id="surrogate"),
    pytest.param(b"abc\xe2\x82", id="truncated-sequence"),
]


def bad(
    name: str, factory: Callable[[], mq.Decoder], data: bytes, reason: str, code: int | None = None
) -> Any:
    """One malformed case: the decoder it hits, the bytes, the reason fragment, the CONNACK code."""
    return pytest.param(factory, data, reason, code, id=name)


MALFORMED = [
    # Framing.
    bad("5-byte length", server, b"\x30\xff\xff\xff\xff\x01", "more than 4 bytes"),
    bad("reserved type 0", server, b"\x00\x00", "packet type 0 is reserved"),
    bad("reserved type 15", server, b"\xf0\x00", "packet type 15 is reserved"),
    bad("PINGREQ length", server, b"\xc0\x01\x00", "PINGREQ: remaining length 1, must be 0"),
    bad("PUBACK length", server, b"\x40\x03\x00\x01\x00", "PUBACK: remaining length 3"),
    bad("DISCONNECT length", server, b"\xe0\x05", "must be 0"),
    # Connection state.
    bad("first not CONNECT", mq.Decoder, b"\xc0\x00", "first packet must be CONNECT, got PINGREQ"),
    bad(
        "first PUBLISH",
        mq.Decoder,
        frame(0x30, s("t")),
        "first packet must be CONNECT, got PUBLISH (MQTT-3.1.0-1)",
    ),
    bad("second CONNECT", server, CONNECT, "second CONNECT on one connection (MQTT-3.1.0-2)"),
    bad("after DISCONNECT", lambda: _disconnected(), b"\xc0\x00", "PINGREQ after DISCONNECT"),
    # Packets that only flow server -> client.
    bad("CONNACK to server", server, CONNACK, "CONNACK must never be sent to a server"),
    bad(
        "SUBACK to server", server, b"\x90\x03\x00\x01\x00", "SUBACK must never be sent to a server"
    ),
    bad("UNSUBACK to server", server, b"\xb0\x02\x00\x01", "UNSUBACK must never be sent"),
    bad("PINGRESP to server", server, b"\xd0\x00", "PINGRESP must never be sent to a server"),
    # Reserved fixed-header flags.
    bad(
        "SUBSCRIBE flags 0",
        server,
        frame(0x80, b"\x00\x01" + s("a") + b"\x00"),
        "0b0000, must be 0b0010",
    ),
    bad(
        "UNSUBSCRIBE flags 0",
        server,
        frame(0xA0, b"\x00\x01" + s("a")),
        "must be 0b0010 (MQTT-2.2.2-1)",
    ),
    bad("PINGREQ flags", server, b"\xc1\x00", "PINGREQ: reserved fixed-header flags are 0b0001"),
    bad("PUBACK flags", server, b"\x42\x02\x00\x01", "PUBACK: reserved fixed-header flags"),
    bad("CONNECT flags", mq.Decoder, frame(0x12, connect_body()), "CONNECT: reserved fixed-header"),
    bad("DISCONNECT flags", server, b"\xef\x00", "DISCONNECT: reserved fixed-header flags"),
    # PUBLISH.
    bad(
        "PUBLISH QoS 3",
        server,
        frame(0x36, s("t") + b"\x00\x01"),
        "PUBLISH: QoS 3 is invalid (MQTT-3.3.1-4)",
    ),
    bad("PUBLISH QoS 2", server, frame(0x34, s("t") + b"\x00\x01"), "QoS 2 is not supported"),
    bad(
        "PUBLISH id 0",
        server,
        frame(0x32, s("t") + b"\x00\x00"),
        "PUBLISH: packet identifier 0 is invalid (MQTT-2.3.1-1)",
    ),
    bad("PUBLISH DUP QoS 0", server, frame(0x38, s("t")), "DUP flag set on a QoS 0 message"),
    bad(
        "PUBLISH wildcard +", server, frame(0x30, s("a/+/c")), "contains a wildcard (MQTT-3.3.2-2)"
    ),
    bad("PUBLISH wildcard #", server, frame(0x30, s("a/#")), "contains a wildcard"),
    bad("PUBLISH empty topic", server, frame(0x30, s("")), "topic name is empty (MQTT-4.7.3-1)"),
    bad(
        "PUBLISH NUL topic",
        server,
        frame(0x30, s("a\x00b")),
        "topic name contains U+0000 (MQTT-1.5.3-2)",
    ),
    bad(
        "PUBLISH no id",
        server,
        frame(0x32, s("t") + b"\x00"),
        "packet identifier runs past the end",
    ),
    bad("PUBLISH short topic", server, frame(0x30, b"\x00\x05ab"), "topic name runs past the end"),
    # QoS 2 flow.
    bad("PUBREC", server, b"\x50\x02\x00\x01", "PUBREC belongs to the QoS 2 flow"),
    bad("PUBREL", server, b"\x62\x02\x00\x01", "PUBREL belongs to the QoS 2 flow"),
    bad("PUBCOMP", server, b"\x70\x02\x00\x01", "PUBCOMP belongs to the QoS 2 flow"),
    # PUBACK / SUBSCRIBE / UNSUBSCRIBE.
    bad("PUBACK id 0", server, b"\x40\x02\x00\x00", "PUBACK: packet identifier 0 is invalid"),
    bad(
        "SUBSCRIBE empty",
        server,
        frame(0x82, b"\x00\x01"),
        "SUBSCRIBE: no topic filters in the payload (MQTT-3.8.3-3)",
    ),
    bad(
        "SUBSCRIBE id 0",
        server,
        frame(0x82, b"\x00\x00" + s("a") + b"\x00"),
        "SUBSCRIBE: packet identifier 0",
    ),
    bad(
        "SUBSCRIBE QoS 3",
        server,
        frame(0x82, b"\x00\x01" + s("a") + b"\x03"),
        "requested QoS byte 0x03 is invalid",
    ),
    bad(
        "SUBSCRIBE QoS high bits",
        server,
        frame(0x82, b"\x00\x01" + s("a") + b"\x81"),
        "requested QoS byte 0x81",
    ),
    bad(
        "SUBSCRIBE no QoS",
        server,
        frame(0x82, b"\x00\x01" + s("a")),
        "requested QoS runs past the end",
    ),
    bad(
        "SUBSCRIBE # not last",
        server,
        frame(0x82, b"\x00\x01" + s("a/#/b") + b"\x00"),
        "'#' must be a whole level and the last one",
    ),
    bad("SUBSCRIBE a#", server, frame(0x82, b"\x00\x01" + s("a#") + b"\x00"), "(MQTT-4.7.1-2)"),
    bad(
        "SUBSCRIBE a+",
        server,
        frame(0x82, b"\x00\x01" + s("a/b+") + b"\x00"),
        "'+' must be a whole level (MQTT-4.7.1-3)",
    ),
    bad(
        "SUBSCRIBE empty filter",
        server,
        frame(0x82, b"\x00\x01" + s("") + b"\x00"),
        "topic filter is empty",
    ),
    bad(
        "UNSUBSCRIBE empty",
        server,
        frame(0xA2, b"\x00\x01"),
        "UNSUBSCRIBE: no topic filters in the payload (MQTT-3.10.3-2)",
    ),
    bad(
        "UNSUBSCRIBE id 0",
        server,
        frame(0xA2, b"\x00\x00" + s("a")),
        "UNSUBSCRIBE: packet identifier 0",
    ),
    bad(
        "UNSUBSCRIBE bad filter",
        server,
        frame(0xA2, b"\x00\x01" + s("a/#/")),
        "'#' must be a whole level",
    ),
    # CONNECT.
    bad(
        "CONNECT name",
        mq.Decoder,
        frame(0x10, connect_body(name=s("MQTX"))),
        "protocol name 'MQTX' is not 'MQTT' (MQTT-3.1.2-1)",
    ),
    bad(
        "CONNECT MQIsdp",
        mq.Decoder,
        frame(0x10, connect_body(name=s("MQIsdp"), level=3)),
        "'MQIsdp' (MQTT 3.1) is not supported",
        code=1,
    ),
    bad(
        "CONNECT level 5",
        mq.Decoder,
        frame(0x10, connect_body(level=5)),
        "protocol level 5 is not 4 (MQTT 3.1.1): unacceptable protocol version",
        code=1,
    ),
    bad(
        "CONNECT level 3",
        mq.Decoder,
        frame(0x10, connect_body(level=3)),
        "protocol level 3",
        code=1,
    ),
    bad(
        "CONNECT reserved flag",
        mq.Decoder,
        frame(0x10, connect_body(flags=0x03)),
        "reserved connect flag (bit 0) is set (MQTT-3.1.2-3)",
    ),
    bad(
        "CONNECT password only",
        mq.Decoder,
        frame(0x10, connect_body(flags=0x42, payload=s("c") + s("p"))),
        "password flag set without username flag (MQTT-3.1.2-22)",
    ),
    bad(
        "CONNECT will QoS no will",
        mq.Decoder,
        frame(0x10, connect_body(flags=0x0A)),
        "will QoS or will retain set without the will flag",
    ),
    bad(
        "CONNECT will retain no will",
        mq.Decoder,
        frame(0x10, connect_body(flags=0x22)),
        "will QoS or will retain set without the will flag",
    ),
    bad(
        "CONNECT will QoS 3",
        mq.Decoder,
        frame(0x10, connect_body(flags=0x1E, payload=s("c") + s("w") + s("m"))),
        "will QoS 3 is invalid (MQTT-3.1.2-14)",
    ),
    bad(
        "CONNECT will wildcard",
        mq.Decoder,
        frame(0x10, connect_body(flags=0x06, payload=s("c") + s("w/#") + s("m"))),
        "CONNECT: will topic name 'w/#' contains a wildcard",
    ),
    bad(
        "CONNECT will empty topic",
        mq.Decoder,
        frame(0x10, connect_body(flags=0x06, payload=s("c") + s("") + s("m"))),
        "CONNECT: will topic name is empty",
    ),
    bad(
        "CONNECT empty id no clean",
        mq.Decoder,
        frame(0x10, connect_body(flags=0x00, payload=s(""))),
        "empty client identifier requires clean session = 1; identifier rejected (MQTT-3.1.3-8)",
        code=2,
    ),
    bad(
        "CONNECT NUL id",
        mq.Decoder,
        frame(0x10, connect_body(payload=s("a\x00"))),
        "CONNECT: client identifier contains U+0000 (MQTT-1.5.3-2)",
    ),
    bad(
        "CONNECT NUL username",
        mq.Decoder,
        frame(0x10, connect_body(flags=0x82, payload=s("c") + s("\x00"))),
        "username contains U+0000",
    ),
    bad(
        "CONNECT missing username",
        mq.Decoder,
        frame(0x10, connect_body(flags=0x82, payload=s("c"))),
        "length of username runs past the end",
    ),
    bad(
        "CONNECT missing will",
        mq.Decoder,
        frame(0x10, connect_body(flags=0x06, payload=s("c"))),
        "length of will topic runs past the end",
    ),
    bad(
        "CONNECT trailing",
        mq.Decoder,
        frame(0x10, connect_body() + b"xx"),
        "CONNECT: 2 unexpected bytes after the last field",
    ),
    bad(
        "CONNECT truncated",
        mq.Decoder,
        frame(0x10, s("MQTT") + b"\x04"),
        "connect flags runs past the end",
    ),
    bad("CONNECT empty", mq.Decoder, frame(0x10, b""), "length of protocol name runs past the end"),
    # Client side: packets that only flow client -> server, and CONNACK rules.
    bad(
        "client first not CONNACK",
        lambda: mq.Decoder(mq.Role.CLIENT),
        b"\xd0\x00",
        "first packet must be CONNACK, got PINGRESP (MQTT-3.2.0-1)",
    ),
    bad("client second CONNACK", client, CONNACK, "second CONNACK on one connection"),
    bad("CONNECT to client", client, CONNECT, "CONNECT must never be sent to a client"),
    bad(
        "SUBSCRIBE to client",
        client,
        frame(0x82, b"\x00\x01" + s("a") + b"\x00"),
        "SUBSCRIBE must never be sent to a client",
    ),
    bad("PINGREQ to client", client, b"\xc0\x00", "PINGREQ must never be sent to a client"),
    bad("DISCONNECT to client", client, b"\xe0\x00", "DISCONNECT must never be sent to a client"),
    bad(
        "CONNACK reserved",
        lambda: mq.Decoder(mq.Role.CLIENT),
        b"\x20\x02\x02\x00",
        "reserved acknowledge flags",
    ),
    bad(
        "CONNACK code 6",
        lambda: mq.Decoder(mq.Role.CLIENT),
        b"\x20\x02\x00\x06",
        "return code 6 is reserved",
    ),
    bad(
        "CONNACK present+fail",
        lambda: mq.Decoder(mq.Role.CLIENT),
        b"\x20\x02\x01\x05",
        "(MQTT-3.2.2-4)",
    ),
    bad(
        "CONNACK length",
        lambda: mq.Decoder(mq.Role.CLIENT),
        b"\x20\x03\x00\x00\x00",
        "CONNACK: remaining length 3, must be 2",
    ),
    bad("SUBACK code 3", client, b"\x90\x03\x00\x01\x03", "SUBACK: return code 0x03 is reserved"),
    bad("SUBACK empty", client, b"\x90\x02\x00\x01", "SUBACK: no return codes"),
    bad(
        "client PUBLISH QoS 2", client, frame(0x34, s("t") + b"\x00\x01"), "QoS 2 is not supported"
    ),
]


@pytest.mark.parametrize(
    ("factory", "data", "reason", "connack_code"),
    MALFORMED,
)
def test_malformed(
    factory: Callable[[], mq.Decoder], data: bytes, reason: str, connack_code: int | None
) -> None:
    error = reject(factory(), data, reason)
    assert error.connack_code == connack_code


@pytest.mark.parametrize(
    ("factory", "data", "reason", "connack_code"),
    MALFORMED,
)
def test_malformed_byte_by_byte(
    factory: Callable[[], mq.Decoder], data: bytes, reason: str, connack_code: int | None
) -> None:
    # The same verdict whichever way the bytes are split.
    decoder = factory()
    with pytest.raises(mq.MQTTProtocolError) as info:
        for index in range(len(data)):
            decoder.feed(data[index : index + 1])
    assert reason in info.value.reason
    assert info.value.connack_code == connack_code


@pytest.mark.parametrize("bad", UTF8_BAD)
@pytest.mark.parametrize(
    ("factory", "build", "what"),
    [
        (mq.Decoder, lambda b: frame(0x10, connect_body(payload=s(b))), "client identifier"),
        (mq.Decoder, lambda b: frame(0x10, s(b) + b"\x04\x02\x00\x00" + s("c")), "protocol name"),
        (
            mq.Decoder,
            lambda b: frame(0x10, connect_body(flags=0x06, payload=s("c") + s(b) + s("m"))),
            "will topic",
        ),
        (
            mq.Decoder,
            lambda b: frame(0x10, connect_body(flags=0x82, payload=s("c") + s(b))),
            "username",
        ),
        (server, lambda b: frame(0x30, s(b)), "topic name"),
        (server, lambda b: frame(0x82, b"\x00\x01" + s(b) + b"\x00"), "topic filter"),
        (server, lambda b: frame(0xA2, b"\x00\x01" + s(b)), "topic filter"),
        (client, lambda b: frame(0x30, s(b)), "topic name"),
    ],
    ids=["client-id", "protocol-name", "will-topic", "username", "publish", "sub", "unsub", "c"],
)
def test_bad_utf8_everywhere(
    factory: Callable[[], mq.Decoder], build: Callable[[bytes], bytes], what: str, bad: bytes
) -> None:
    reject(factory(), build(bad), f"{what} is not well-formed UTF-8 (MQTT-1.5.3-1)")


def test_password_and_payloads_are_binary_not_utf8() -> None:
    # Only strings are checked for UTF-8: a password, will message or payload may be any bytes.
    decoder = mq.Decoder()
    body = connect_body(
        flags=0xC6, payload=s("c") + s("w") + s(b"\xff\x00") + s("u") + s(b"\xc0\x80\x00")
    )
    [packet] = decoder.feed(frame(0x10, body))
    assert packet == mq.Connect(
        "c", username="u", password=b"\xc0\x80\x00", will=mq.Will("w", b"\xff\x00")
    )
    assert server().feed(frame(0x30, s("t") + b"\xff\x00\xed\xa0\x80")) == [
        mq.Publish("t", b"\xff\x00\xed\xa0\x80")
    ]


def test_empty_client_id_with_clean_session_is_accepted() -> None:
    # The server may assign an identifier (MQTT-3.1.3-6); the gateway decides, not the codec.
    [packet] = mq.Decoder().feed(frame(0x10, connect_body(payload=s(""))))
    assert packet == mq.Connect("", clean_session=True)


def test_subscribe_may_request_qos_2() -> None:
    # Requesting QoS 2 is legal; the server grants less in its SUBACK (MQTT-3.9.3).
    data = frame(0x82, b"\x00\x01" + s("a") + b"\x02")
    assert server().feed(data) == [mq.Subscribe(1, [("a", 2)])]


def _disconnected() -> mq.Decoder:
    decoder = server()
    assert decoder.feed(b"\xe0\x00") == [mq.Disconnect()]
    return decoder


def _length_rejected_within(decoder: mq.Decoder, data: bytes) -> int:
    """Feed byte by byte; return how many bytes were fed when the error came."""
    for index in range(len(data)):
        try:
            assert decoder.feed(data[index : index + 1]) == []
        except mq.MQTTProtocolError as exc:
            assert decoder.buffered == 0
            # Over the maximum, over 4 length bytes, or the wrong size for a fixed-size packet.
            assert "remaining length" in exc.reason, exc.reason
            return index + 1
    raise AssertionError("never rejected")


def test_declared_length_over_max_rejected_at_the_header() -> None:
    decoder = mq.Decoder(max_remaining_length=1000)
    decoder.feed(CONNECT)
    # 1001 > 1000: refused on the third byte, before a single body byte is awaited.
    error = reject(decoder, b"\x30" + varint(1001), "PUBLISH: declared remaining length 1001")
    assert "exceeds the maximum 1000" in error.reason
    # Exactly the maximum is fine.
    decoder = mq.Decoder(max_remaining_length=1000)
    decoder.feed(CONNECT)
    packet = mq.Publish("t", b"x" * 997)
    assert decoder.feed(mq.encode(packet)) == [packet]


def test_oversized_connect_rejected_before_connect_is_seen() -> None:
    decoder = mq.Decoder(max_remaining_length=64)
    assert _length_rejected_within(decoder, b"\x10" + varint(65) + b"x" * 65) == 2
    decoder = mq.Decoder(max_remaining_length=64)
    assert _length_rejected_within(decoder, b"\x10" + varint(300) + b"x" * 300) == 3


def test_protocol_maximum_length_rejected_after_five_bytes() -> None:
    decoder = server()
    assert _length_rejected_within(decoder, b"\x30\xff\xff\xff\x7f" + b"x" * 100) == 5


def test_wrong_first_byte_rejected_after_one_byte() -> None:
    # Type, role, state and flags are all judged from the first byte alone.
    for data, reason in [
        (b"\x20", "CONNACK must never be sent to a server"),
        (b"\xc1", "PINGREQ: reserved fixed-header flags"),
        (b"\x00", "packet type 0 is reserved"),
        (b"\x50", "PUBREC belongs to the QoS 2 flow"),
        (b"\x36", "PUBLISH: QoS 3 is invalid"),
        (b"\x10", "second CONNECT"),
    ]:
        decoder = server()
        reject(decoder, data, reason)
    reject(mq.Decoder(), b"\x30", "first packet must be CONNECT")


# ----------------------------------------------------------------------------------------------
# Encoder validation.


@pytest.mark.parametrize(
    ("packet", "problem"),
    [
        (mq.Publish("a/+", b""), "contains a wildcard"),
        (mq.Publish("", b""), "topic name is empty"),
        (mq.Publish("t", qos=2, packet_id=1), "QoS 2 is outside 0..1"),
        (mq.Publish("t", qos=1), "QoS 1 needs a packet identifier"),
        (mq.Publish("t", packet_id=3), "QoS 0 must not carry a packet identifier"),
        (mq.Publish("t", dup=True), "DUP must be 0 at QoS 0"),
        (mq.Publish("t", qos=1, packet_id=0), "packet identifier 0 is outside 1..65535"),
        (mq.Publish("t", qos=1, packet_id=65536), "packet identifier 65536"),
        (mq.Publish("a\x00"), "topic name contains U+0000"),
        (mq.Publish("\ud800"), "lone surrogate"),
        (mq.Publish("x" * 65536), "more than 65535"),
        (mq.Puback(0), "packet identifier 0"),
        (mq.Subscribe(1, []), "no topic filters"),
        (mq.Subscribe(1, [("a/#/b", 0)]), "'#' must be a whole level"),
        (mq.Subscribe(1, [("a", 3)]), "requested QoS 3 is outside 0..2"),
        (mq.Unsubscribe(1, []), "no topic filters"),
        (mq.Unsubscribe(1, ["+a"]), "'+' must be a whole level"),
        (mq.Suback(1, []), "no return codes"),
        (mq.Suback(1, [3]), "return code 3 is reserved"),
        (mq.Unsuback(70000), "packet identifier 70000"),
        (mq.Connack(return_code=6), "return code 6 is reserved"),
        (mq.Connack(True, 1), "session present must be 0"),
        (mq.Connect("c", password=b"p"), "a password needs a username"),
        (mq.Connect("c", keepalive=65536), "keepalive 65536"),
        (mq.Connect("c", protocol_level=256), "protocol level 256"),
        (mq.Connect("c", will=mq.Will("w", b"", qos=3)), "will QoS 3"),
        (mq.Connect("c", will=mq.Will("w/#", b"")), "will topic name 'w/#' contains a wildcard"),
        (mq.Connect("c", password=b"p" * 65536, username="u"), "password is 65536 bytes"),
    ],
    ids=repr,
)
def test_encoder_refuses_invalid_packets(packet: mq.Packet, problem: str) -> None:
    with pytest.raises(mq.MQTTEncodeError, match="cannot encode") as info:
        mq.encode(packet)
    assert problem in str(info.value)
    assert isinstance(info.value, ValueError)


def test_encoder_refuses_non_packets() -> None:
    with pytest.raises(mq.MQTTEncodeError, match="not an MQTT packet"):
        mq.encode("PINGREQ")  # type: ignore[arg-type]


def test_encoder_refuses_body_over_protocol_maximum() -> None:
    with pytest.raises(mq.MQTTEncodeError, match="exceeds 268435455"):
        mq.encode(mq.Publish("t", bytes(mq.PROTOCOL_MAX_REMAINING_LENGTH)))


# ----------------------------------------------------------------------------------------------
# Hypothesis.

texts = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=20)
topic_names = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00+#"), min_size=1, max_size=20
)
plain_levels = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00+#/"), max_size=6
)
topic_filters = st.builds(
    lambda levels, tail: "/".join(levels + tail),
    st.lists(st.one_of(plain_levels, st.just("+")), min_size=1, max_size=4),
    st.sampled_from([[], ["#"]]),
).filter(bool)
packet_ids = st.integers(1, 0xFFFF)
payloads = st.binary(max_size=64)


@st.composite
def publishes(draw: st.DrawFn) -> mq.Publish:
    qos = draw(st.integers(0, 1))
    return mq.Publish(
        draw(topic_names),
        draw(payloads),
        qos,
        draw(st.booleans()),
        draw(st.booleans()) if qos else False,
        draw(packet_ids) if qos else None,
    )


@st.composite
def connects(draw: st.DrawFn) -> mq.Connect:
    username = draw(st.none() | texts)
    clean = draw(st.booleans())
    client_id = draw(texts if clean else texts.filter(bool))
    return mq.Connect(
        client_id,
        clean,
        draw(st.integers(0, 0xFFFF)),
        username,
        draw(st.none() | payloads) if username is not None else None,
        draw(
            st.none() | st.builds(mq.Will, topic_names, payloads, st.integers(0, 2), st.booleans())
        ),
    )


client_packets = st.one_of(
    publishes(),
    st.builds(mq.Puback, packet_ids),
    st.builds(
        mq.Subscribe,
        packet_ids,
        st.lists(st.tuples(topic_filters, st.integers(0, 2)), min_size=1, max_size=4),
    ),
    st.builds(mq.Unsubscribe, packet_ids, st.lists(topic_filters, min_size=1, max_size=4)),
    st.just(mq.Pingreq()),
)
server_packets = st.one_of(
    publishes(),
    st.builds(mq.Puback, packet_ids),
    st.builds(
        mq.Suback, packet_ids, st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=4)
    ),
    st.builds(mq.Unsuback, packet_ids),
    st.just(mq.Pingresp()),
)
connacks = st.one_of(
    st.builds(mq.Connack, st.booleans(), st.just(0)),
    st.builds(mq.Connack, st.just(False), st.integers(0, 5)),
)


@st.composite
def client_streams(draw: st.DrawFn) -> list[mq.Packet]:
    packets: list[mq.Packet] = [draw(connects()), *draw(st.lists(client_packets, max_size=8))]
    if draw(st.booleans()):
        packets.append(mq.Disconnect())
    return packets


@st.composite
def server_streams(draw: st.DrawFn) -> list[mq.Packet]:
    return [draw(connacks), *draw(st.lists(server_packets, max_size=8))]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def decode_chunks(decoder: mq.Decoder, chunks: list[bytes]) -> list[mq.Packet]:
    out: list[mq.Packet] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out


@given(client_streams(), st.lists(st.integers(0, 10_000), max_size=12))
def test_round_trip_client_to_server_any_split(packets: list[mq.Packet], cuts: list[int]) -> None:
    data = b"".join(mq.encode(p) for p in packets)
    decoder = mq.Decoder(mq.Role.SERVER)
    assert decode_chunks(decoder, split(data, cuts)) == packets
    assert decoder.buffered == 0


@given(server_streams(), st.lists(st.integers(0, 10_000), max_size=12))
def test_round_trip_server_to_client_any_split(packets: list[mq.Packet], cuts: list[int]) -> None:
    data = b"".join(mq.encode(p) for p in packets)
    decoder = mq.Decoder(mq.Role.CLIENT)
    assert decode_chunks(decoder, split(data, cuts)) == packets
    assert decoder.buffered == 0


def check_fuzz(decoder: mq.Decoder, chunks: list[bytes]) -> None:
    """Only packets or MQTTProtocolError; never more than max + 5 bytes held; and whatever is
    accepted re-encodes to something that decodes to the same packet."""
    limit = decoder.max_remaining_length + 5
    for chunk in chunks:
        try:
            packets = decoder.feed(chunk)
        except mq.MQTTProtocolError as exc:
            assert exc.reason
            assert decoder.buffered == 0
            return
        assert decoder.buffered <= limit
        for packet in packets:
            assert isinstance(packet, PACKET_TYPES)
            again = mq.Decoder(decoder.role)
            if decoder.role is mq.Role.SERVER and not isinstance(packet, mq.Connect):
                again.feed(CONNECT)
            elif decoder.role is mq.Role.CLIENT and not isinstance(packet, mq.Connack):
                again.feed(CONNACK)
            assert again.feed(mq.encode(packet)) == [packet]


roles = st.sampled_from(list(mq.Role))
limits = st.sampled_from([0, 3, 40, mq.DEFAULT_MAX_REMAINING_LENGTH])


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(roles, limits, st.booleans(), st.binary(max_size=300), st.lists(st.integers(0, 400)))
def test_fuzz_arbitrary_bytes(
    role: mq.Role, limit: int, handshake: bool, data: bytes, cuts: list[int]
) -> None:
    decoder = mq.Decoder(role, max_remaining_length=max(limit, 32 if handshake else 0))
    if handshake:
        decoder.feed(CONNECT if role is mq.Role.SERVER else CONNACK)
    check_fuzz(decoder, split(data, cuts))


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.data(),
    roles,
    st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from(["flip", "insert", "delete"])),
        min_size=1,
        max_size=4,
    ),
    st.lists(st.integers(0, 10_000), max_size=6),
)
def test_fuzz_mutated_valid_streams(
    data: st.DataObject, role: mq.Role, edits: list[tuple[int, str]], cuts: list[int]
) -> None:
    # Random bytes rarely get past the first byte; mutating valid streams reaches deep fields.
    stream = data.draw(client_streams() if role is mq.Role.SERVER else server_streams())
    raw = bytearray(b"".join(mq.encode(p) for p in stream))
    for position, edit in edits:
        index = position % (len(raw) + 1)
        byte = data.draw(st.integers(0, 255))
        if edit == "insert" or index == len(raw):
            raw.insert(index, byte)
        elif edit == "flip":
            raw[index] ^= byte or 0xFF
        else:
            del raw[index]
    check_fuzz(mq.Decoder(role, max_remaining_length=200), split(bytes(raw), cuts))


@given(
    # At least the CONNECT's own body, which must get through first.
    st.integers(len(CONNECT), 300),
    st.integers(1, mq.PROTOCOL_MAX_REMAINING_LENGTH),
    st.sampled_from([0x30, 0x32, 0x82, 0xA2, 0x40]),
)
def test_declared_huge_length_rejected_within_five_bytes(
    limit: int, excess: int, first: int
) -> None:
    declared = min(limit + excess, mq.PROTOCOL_MAX_REMAINING_LENGTH)
    decoder = mq.Decoder(max_remaining_length=limit)
    decoder.receive_data(CONNECT)
    assert decoder.next_packet() is not None
    fed = _length_rejected_within(decoder, bytes((first,)) + varint(declared) + b"\x00" * 10)
    assert fed <= 5


@given(st.binary(min_size=4, max_size=4).map(lambda b: bytes(x | 0x80 for x in b)))
def test_five_byte_lengths_rejected_within_five_bytes(length: bytes) -> None:
    fed = _length_rejected_within(server(), b"\x30" + length + b"\x01")
    assert fed == 5


# ----------------------------------------------------------------------------------------------
# A real client nobody here wrote: paho-mqtt against a loopback listener speaking with this codec.

paho = pytest.importorskip("paho.mqtt.client")


class _Broker:
    """A one-connection loopback server that decodes with the codec and answers with it."""

    def __init__(self, command: mq.Publish | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.packets: list[mq.Packet] = []
        self.errors: list[BaseException] = []
        self.pinged = threading.Event()
        self.command_acked = threading.Event()
        self.command = command
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.listener.settimeout(10)
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(10)
                self._serve(conn)
        except BaseException as exc:  # reported to the test thread, which asserts on it
            self.errors.append(exc)
        finally:
            self.listener.close()

    def _serve(self, conn: socket.socket) -> None:
        decoder = mq.Decoder()
        while data := conn.recv(4096):
            for packet in decoder.feed(data):
                self.packets.append(packet)
                if isinstance(packet, mq.Connect):
                    conn.sendall(mq.encode(mq.Connack()))
                elif isinstance(packet, mq.Publish) and packet.qos == 1:
                    assert packet.packet_id is not None
                    conn.sendall(mq.encode(mq.Puback(packet.packet_id)))
                elif isinstance(packet, mq.Subscribe):
                    granted = [min(qos, 1) for _, qos in packet.topics]
                    conn.sendall(mq.encode(mq.Suback(packet.packet_id, granted)))
                    if self.command is not None:
                        conn.sendall(mq.encode(self.command))
                elif isinstance(packet, mq.Puback):
                    self.command_acked.set()
                elif isinstance(packet, mq.Pingreq):
                    conn.sendall(mq.encode(mq.Pingresp()))
                    self.pinged.set()
                elif isinstance(packet, mq.Disconnect):
                    return


def _wait(event: threading.Event, what: str, timeout: float = 10) -> None:
    assert event.wait(timeout), f"timed out waiting for {what}"


@pytest.mark.timeout(60)
def test_paho_client_interoperates() -> None:
    topic_cmd = "devices/dev-1/commands"
    command = mq.Publish(topic_cmd, b"reboot", qos=1, packet_id=7)
    broker = _Broker(command)
    connected, subscribed, got_command = threading.Event(), threading.Event(), threading.Event()
    received: list[tuple[str, bytes, int]] = []
    connack_codes: list[object] = []

    def on_connect(c: object, u: object, flags: object, reason: object, props: object) -> None:
        connack_codes.append(reason)
        connected.set()

    def on_subscribe(c: object, u: object, mid: object, codes: object, props: object) -> None:
        subscribed.set()

    def on_message(c: object, u: object, msg: paho.MQTTMessage) -> None:
        received.append((msg.topic, msg.payload, msg.qos))
        got_command.set()

    mqttc = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id="dev-1",
        protocol=paho.MQTTv311,
        clean_session=True,
    )
    mqttc.username_pw_set("alice", "s3cret")
    mqttc.will_set("devices/dev-1/status", b"offline", qos=1, retain=True)
    mqttc.on_connect = on_connect
    mqttc.on_subscribe = on_subscribe
    mqttc.on_message = on_message
    # keepalive=1 makes paho send a PINGREQ within about a second of silence.
    mqttc.connect("127.0.0.1", broker.port, keepalive=1)
    mqttc.loop_start()
    try:
        _wait(connected, "CONNACK")
        info = mqttc.publish("devices/dev-1/telemetry", b"21.5", qos=1)
        info.wait_for_publish(timeout=10)
        assert info.is_published()
        mqttc.subscribe(topic_cmd, qos=1)
        _wait(subscribed, "SUBACK")
        _wait(got_command, "the command PUBLISH")
        _wait(broker.command_acked, "the client's PUBACK")
        _wait(broker.pinged, "PINGREQ")
    finally:
        mqttc.disconnect()
        mqttc.loop_stop()
        broker.thread.join(10)
    assert not broker.errors, broker.errors
    assert [str(code) for code in connack_codes] == ["Success"]
    assert received == [(topic_cmd, b"reboot", 1)]

    packets = broker.packets
    assert packets[0] == mq.Connect(
        "dev-1",
        clean_session=True,
        keepalive=1,
        username="alice",
        password=b"s3cret",
        will=mq.Will("devices/dev-1/status", b"offline", qos=1, retain=True),
    )
    publishes_seen = [p for p in packets if isinstance(p, mq.Publish)]
    assert len(publishes_seen) == 1
    publish = publishes_seen[0]
    assert (publish.topic, publish.payload, publish.qos, publish.retain, publish.dup) == (
        "devices/dev-1/telemetry",
        b"21.5",
        1,
        False,
        False,
    )
    assert publish.packet_id is not None
    [subscribe] = [p for p in packets if isinstance(p, mq.Subscribe)]
    assert subscribe.topics == ((topic_cmd, 1),)
    assert mq.Puback(7) in packets
    assert mq.Pingreq() in packets
    assert packets[-1] == mq.Disconnect()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("protocol_name", "reason"),
    [("MQTTv5", "protocol level 5 is not 4"), ("MQTTv31", "'MQIsdp' (MQTT 3.1) is not supported")],
)
def test_paho_other_protocol_versions_get_connack_1(protocol_name: str, reason: str) -> None:
    # Real MQTT 5 and MQTT 3.1 CONNECTs from paho: the codec must ask for CONNACK 1, not choke.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    errors: list[mq.MQTTProtocolError] = []

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                decoder = mq.Decoder()
                while data := conn.recv(4096):
                    try:
                        decoder.feed(data)
                    except mq.MQTTProtocolError as exc:
                        errors.append(exc)
                        if exc.connack_code is not None:
                            conn.sendall(mq.encode(mq.Connack(return_code=exc.connack_code)))
                        return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    mqttc = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id="old-or-new",
        protocol=getattr(paho, protocol_name),
    )
    mqttc.connect("127.0.0.1", port, keepalive=30)
    mqttc.loop_start()
    try:
        thread.join(10)
    finally:
        mqttc.loop_stop()
        mqttc.disconnect()
    [error] = errors
    assert reason in error.reason
    assert error.connack_code == mq.ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION


# -- nothing lost: packets before a malformed one, however TCP splits the bytes ----------------

_CONNECT = mq.encode(mq.Connect("split-device", username="alice", password=b"pw"))
_GOOD = [
    mq.Publish("devices/a", b"zero"),
    mq.Publish("devices/b", b"one", qos=1, packet_id=9),
    mq.Pingreq(),
]
#: Five remaining-length bytes: malformed whatever follows (MQTT 2.2.3).
_MALFORMED = b"\x30\xff\xff\xff\xff\x01"


@given(cuts=st.lists(st.integers(min_value=0), max_size=12), bad=st.booleans())
def test_decoder_yields_the_same_packets_however_the_stream_is_split(
    cuts: list[int], bad: bool
) -> None:
    data = _CONNECT + b"".join(mq.encode(p) for p in _GOOD) + (_MALFORMED if bad else b"")
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    decoder = mq.Decoder(mq.Role.SERVER)
    packets: list[mq.Packet] = []
    error = None
    for a, b in zip(edges, edges[1:], strict=False):
        try:
            packets.extend(decoder.feed(data[a:b]))
        except mq.MQTTProtocolError as exc:
            # What keepconn's connection does: take the frames the error hands over.
            packets.extend(exc.frames)
            error = exc
            break
    assert packets[1:] == _GOOD and isinstance(packets[0], mq.Connect)
    assert (error is not None) is bad
    if bad:
        assert "more than 4 bytes" in str(error)


def test_decoder_error_after_good_packets_carries_them_once() -> None:
    decoder = mq.Decoder(mq.Role.SERVER)
    with pytest.raises(mq.MQTTProtocolError) as caught:
        decoder.feed(_CONNECT + mq.encode(_GOOD[0]) + _MALFORMED)
    assert [type(p) for p in caught.value.frames] == [mq.Connect, mq.Publish]
    # The decoder stays failed, and a later call does not hand the packets over again.
    with pytest.raises(mq.MQTTProtocolError) as again:
        decoder.feed(b"")
    assert again.value.frames == ()
