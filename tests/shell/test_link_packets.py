"""A received PUBLISH and PUBACK as the link reads them without paho's `Properties`: every
field as paho's own encoder wrote it, anything odd left to paho, and the same callbacks as
paho's own reading gives."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.client import MQTTMessage, MQTTv5, MQTTv311
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_starter.mqtt.link import Incoming, _Client, _incoming, _variable_int
from mqtt_starter.mqtt.packets import Publish, read_publish

TEXT = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)


def _properties(**values: Any) -> bytes:
    """A property block as paho's encoder writes it."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    return bytes(props.pack())  # type: ignore[no-untyped-call]


def _body(topic: bytes, mid: int | None, props: bytes | None, payload: bytes) -> bytes:
    """A PUBLISH after its fixed header: topic, packet id (QoS 1), properties (MQTT 5)."""
    body = len(topic).to_bytes(2, "big") + topic
    if mid is not None:
        body += mid.to_bytes(2, "big")
    return body + (props if props is not None else b"") + payload


def _packet(header: int, body: bytes) -> bytes:
    """The whole packet: its first byte, the remaining length, the body."""
    return bytes([header]) + _variable_int(len(body)) + body


@given(
    topic=TEXT,
    mid=st.integers(1, 65535),
    response_topic=st.none() | TEXT,
    correlation=st.none() | st.binary(max_size=40),
    others=st.fixed_dictionaries(
        {},
        optional={
            "PayloadFormatIndicator": st.integers(0, 1),
            "MessageExpiryInterval": st.integers(0, 2**32 - 1),
            "ContentType": TEXT,
            "TopicAlias": st.integers(1, 65535),
            "SubscriptionIdentifier": st.lists(st.integers(1, 2**28 - 1), min_size=1, max_size=3),
            "UserProperty": st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3),
        },
    ),
    payload=st.binary(max_size=64),
)
def test_every_field_is_read_as_paho_wrote_it(
    topic: str,
    mid: int,
    response_topic: str | None,
    correlation: bytes | None,
    others: dict[str, Any],
    payload: bytes,
) -> None:
    values = dict(others)
    if response_topic is not None:
        values["ResponseTopic"] = response_topic
    if correlation is not None:
        values["CorrelationData"] = correlation
    body = _body(topic.encode(), mid, _properties(**values), payload)
    assert read_publish(body, 1, v5=True) == Publish(
        topic.encode(), mid, response_topic, correlation, payload
    )


def test_qos_0_has_no_packet_id_and_3_1_1_no_properties() -> None:
    assert read_publish(_body(b"a/b", None, b"\x00", b"x"), 0, v5=True) == Publish(
        b"a/b", 0, None, None, b"x"
    )
    # On 3.1.1 the bytes after the packet id are the payload, whatever they look like.
    assert read_publish(_body(b"a/b", 7, None, b"\x00\x08"), 1, v5=False) == Publish(
        b"a/b", 7, None, None, b"\x00\x08"
    )


def test_an_empty_topic_is_one_only_on_mqtt_5() -> None:
    """MQTT 5 allows it (a topic alias stands for the topic); on 3.1.1 it is malformed."""
    assert read_publish(_body(b"", 1, b"\x03\x23\x00\x01", b""), 1, v5=True) == Publish(
        b"", 1, None, None, b""
    )
    assert read_publish(_body(b"", 1, None, b"x"), 1, v5=False) is None


def test_a_packet_cut_before_its_payload_is_left_to_paho() -> None:
    body = _body(b"a/b", 9, _properties(ResponseTopic="r", CorrelationData=b"c"), b"")
    for size in range(len(body)):
        assert read_publish(body[:size], 1, v5=True) is None, size
    assert read_publish(body, 1, v5=True) == Publish(b"a/b", 9, "r", b"c", b"")


@pytest.mark.parametrize(
    ("props", "why"),
    [
        (b"\x02\x24\x00", "an identifier a PUBLISH may not carry (Maximum QoS)"),
        (b"\x02\x7f\x00", "an identifier MQTT 5 does not define"),
        (b"\x06\x08\x00\x01r\x08\x00", "a Response Topic twice (the block cut)"),
        (b"\x08\x08\x00\x01r\x08\x00\x01s", "a Response Topic twice"),
        (b"\x06\x09\x00\x01c\x09\x00\x00"[:7], "Correlation Data twice (cut)"),
        (b"\x07\x09\x00\x01c\x09\x00\x00", "Correlation Data twice"),
        (b"\x05\x08\x00\x02\xff\xfe", "a Response Topic that is not UTF-8"),
        (b"\x03\x08\x00\x05", "a value longer than the block"),
        (b"\x02\x02\x00\x00\x00\x00", "a value running past the block's stated length"),
        (b"\x04\x26\x00\x01k", "a User Property without its value"),
        (b"\x06\x0b\xff\xff\xff\xff\x01", "a Subscription Identifier of five bytes"),
        (b"\xff\xff\xff\xff\x01", "a block length of five bytes"),
    ],
)
def test_what_is_odd_is_left_to_paho(props: bytes, why: str) -> None:
    assert read_publish(_body(b"a/b", 1, props, b"payload"), 1, v5=True) is None, why


def test_qos_2_is_left_to_paho() -> None:
    assert read_publish(_body(b"a/b", 1, b"\x00", b"x"), 2, v5=True) is None


# -- through paho's own reading ----------------------------------------------------------------


Reading = tuple[_Client, socket.socket, list[MQTTMessage]]


@contextlib.contextmanager
def reading(protocol: MQTTProtocolVersion) -> Iterator[Reading]:
    """A client reading one end of a socket pair, its messages collected; the test writes to
    the other end as the broker."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)  # a read for a packet the client never sent fails, never hangs
    client = _Client(CallbackAPIVersion.VERSION2, client_id="packets", protocol=protocol)
    client._sock = ours
    received: list[MQTTMessage] = []
    client.on_message = lambda _c, _u, message: received.append(message)
    try:
        yield client, theirs, received
    finally:
        ours.close()
        theirs.close()


@pytest.fixture
def v5() -> Iterator[Reading]:
    with reading(MQTTv5) as parts:
        yield parts


def _read_all(client: _Client) -> None:
    client.loop_read()
    while client.buffered():
        client.loop_read()


def test_a_trigger_reaches_the_link_as_paho_would_give_it(
    v5: Reading,
) -> None:
    client, theirs, received = v5
    client.manual_ack_set(True)
    props = _properties(ResponseTopic="bench/replies", CorrelationData=b"\x01\x02", ContentType="t")
    theirs.sendall(_packet(0x33, _body(b"butler/start/tag/Nightly", 42, props, b"{}")))  # retain
    _read_all(client)
    [message] = received
    assert (message.mid, message.qos, message.retain, message.dup) == (42, 1, True, False)
    assert _incoming(message) == Incoming(
        "butler/start/tag/Nightly", b"{}", True, "bench/replies", b"\x01\x02"
    )
    theirs.setblocking(False)
    with pytest.raises(BlockingIOError):  # manual acknowledgement: nothing sent back
        theirs.recv(16)


def test_without_manual_acknowledgement_paho_acknowledges_at_once(
    v5: Reading,
) -> None:
    client, theirs, received = v5
    theirs.sendall(_packet(0x32, _body(b"a/b", 0x0102, b"\x00", b"x")))
    _read_all(client)
    assert [m.payload for m in received] == [b"x"]
    assert theirs.recv(16) == b"\x40\x02\x01\x02"  # PUBACK for packet id 0x0102


def test_qos_2_is_read_by_paho_and_given_after_pubrel(
    v5: Reading,
) -> None:
    client, theirs, received = v5
    theirs.sendall(_packet(0x34, _body(b"a/b", 5, b"\x00", b"x")))
    _read_all(client)
    assert received == []
    assert theirs.recv(16) == b"\x50\x02\x00\x05"  # PUBREC
    theirs.sendall(b"\x62\x02\x00\x05")  # PUBREL
    _read_all(client)
    assert [(m.topic, m.payload, m.qos) for m in received] == [("a/b", b"x", 2)]


def test_a_malformed_publish_is_refused_by_paho(v5: Reading) -> None:
    client, theirs, received = v5
    ended: list[bool] = []
    client.on_disconnect = lambda *_: ended.append(True)
    theirs.sendall(_packet(0x32, _body(b"a/b", 1, b"\x02\x7f\x00", b"x")))
    assert client.loop_read() == MQTTErrorCode.MQTT_ERR_PROTOCOL
    assert (received, ended) == ([], [True])  # the connection is over: the link connects again


def test_a_puback_tells_its_publication_once(
    v5: Reading,
) -> None:
    client, theirs, _ = v5
    told: list[tuple[int, int, bool]] = []
    client.on_publish = lambda _c, _u, mid, reason, _p: told.append(
        (mid, reason.value, reason.is_failure)
    )
    first = client.publish("a/b", b"1", qos=1)
    second = client.publish("a/b", b"2", qos=1)
    theirs.recv(4096)  # the two PUBLISHes
    puback = bytes([0x40, 0x02]) + first.mid.to_bytes(2, "big")
    refused = bytes([0x40, 0x03]) + second.mid.to_bytes(2, "big") + b"\x87"  # Not authorized
    theirs.sendall(puback + puback + refused)  # the first twice: told once
    _read_all(client)
    assert told == [(first.mid, 0, False), (second.mid, 0x87, True)]


def test_mqtt_3_1_1_reads_the_same() -> None:
    with reading(MQTTv311) as (client, theirs, received):
        client.manual_ack_set(True)
        theirs.sendall(_packet(0x32, _body(b"a/b", 3, None, b"\x00\x08x")))
        _read_all(client)
        [message] = received
        assert (message.topic, message.mid, message.payload, message.properties) == (
            "a/b",
            3,
            b"\x00\x08x",
            None,
        )


def test_a_request_s_packets_make_no_paho_properties(
    v5: Reading, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the link's reading is for: paho's Properties cost more than the rest of it."""
    client, theirs, received = v5
    client.manual_ack_set(True)
    told: list[int] = []
    client.on_publish = lambda _c, _u, mid, _r, _p: told.append(mid)
    reply = client.publish("bench/replies", b"{}", qos=1)
    props = _properties(ResponseTopic="bench/replies", CorrelationData=b"\x01")
    trigger = _packet(0x32, _body(b"butler/start/id/1", 1, props, b""))
    made: list[int] = []
    real = Properties.__init__

    def counted(self: Properties, packet_type: int) -> None:
        made.append(packet_type)
        real(self, packet_type)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(Properties, "__init__", counted)
    theirs.sendall(trigger + bytes([0x40, 0x02]) + reply.mid.to_bytes(2, "big"))
    _read_all(client)
    assert (len(received), told, made) == (1, [reply.mid], [])
