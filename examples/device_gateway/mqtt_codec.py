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

The codec is split by job; this module is its interface and the only one the gateway, the fleet
and the benchmarks import. ``mqtt_packets`` holds the records, limits and shared rules,
``mqtt_parsers`` turns one packet's body into its record, ``mqtt_decoder`` is the streaming
:class:`Decoder` and ``mqtt_encoder`` is :func:`encode`; the names with a leading underscore
that they import from each other are shared among those parts only.
"""

from __future__ import annotations

from device_gateway.mqtt_decoder import Decoder
from device_gateway.mqtt_encoder import encode
from device_gateway.mqtt_packets import (
    DEFAULT_MAX_REMAINING_LENGTH,
    PROTOCOL_MAX_REMAINING_LENGTH,
    SUBACK_FAILURE,
    Connack,
    ConnackCode,
    Connect,
    Disconnect,
    MQTTEncodeError,
    MQTTProtocolError,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Role,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    Will,
)

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
