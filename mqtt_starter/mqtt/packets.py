"""A received PUBLISH read from its bytes: what the link needs of every trigger, at the cost of
a few slices.

paho reads MQTT 5 properties into a `Properties` object that builds its name tables anew for
each instance and looks every name up by scanning them: for a trigger's two properties
(Response Topic, Correlation Data) that cost more than the rest of receiving it. This reader
takes the common case only; for anything it cannot vouch for it answers None, and paho reads
the packet as it always did (and says what is wrong with it).

Pure: no I/O, no MQTT library.
"""

from __future__ import annotations

from dataclasses import dataclass

# MQTT 5, 2.2.2.2: the properties a PUBLISH may carry, by how their values are laid out.
# Fixed widths: Payload Format Indicator, Message Expiry Interval, Topic Alias.
_FIXED_WIDTH = {0x01: 1, 0x02: 4, 0x23: 2}
_CONTENT_TYPE = 0x03  # UTF-8 string
_RESPONSE_TOPIC = 0x08  # UTF-8 string
_CORRELATION_DATA = 0x09  # binary data
_SUBSCRIPTION_ID = 0x0B  # variable byte integer
_USER_PROPERTY = 0x26  # UTF-8 string pair


@dataclass(frozen=True, slots=True)
class Publish:
    """A PUBLISH's variable header and payload: the topic as sent (bytes), the packet id (0 at
    QoS 0), the two properties a request uses, and the payload."""

    topic: bytes
    mid: int
    response_topic: str | None
    correlation_data: bytes | None
    payload: bytes


def read_publish(body: bytes | bytearray, qos: int, *, v5: bool) -> Publish | None:
    """`body`: the packet after its fixed header. None when the packet is not a well-formed
    PUBLISH at QoS 0 or 1 (QoS 2, a truncated field, an unknown or repeated property, an empty
    topic on 3.1.1, a Response Topic that is not UTF-8)."""
    data = bytes(body)
    if qos not in (0, 1) or len(data) < 2:
        return None
    end = 2 + int.from_bytes(data[:2], "big")
    topic = data[2:end]
    if len(topic) != end - 2 or (not v5 and not topic):
        return None
    mid = 0
    if qos:
        if len(data) < end + 2:
            return None
        mid = int.from_bytes(data[end : end + 2], "big")
        end += 2
    response_topic: str | None = None
    correlation: bytes | None = None
    if v5:
        read = _properties(data, end)
        if read is None:
            return None
        end, response_topic, correlation = read
    return Publish(topic, mid, response_topic, correlation, data[end:])


def _properties(data: bytes, at: int) -> tuple[int, str | None, bytes | None] | None:
    """The property block at `at`: where it ends, the Response Topic and the Correlation Data."""
    length = _variable_int(data, at)
    if length is None:
        return None
    size, at = length
    end = at + size
    if end > len(data):
        return None
    response_topic: str | None = None
    correlation: bytes | None = None
    while at < end:
        ident = data[at]
        at += 1
        if ident in _FIXED_WIDTH:
            at += _FIXED_WIDTH[ident]  # past the block is caught below
        elif ident == _SUBSCRIPTION_ID:
            number = _variable_int(data, at)
            if number is None:
                return None
            at = number[1]
        elif ident in (_CONTENT_TYPE, _RESPONSE_TOPIC, _CORRELATION_DATA):
            field = _field(data, at, end)
            if field is None:
                return None
            value, at = field
            if ident == _RESPONSE_TOPIC:
                if response_topic is not None:
                    return None  # at most once (3.3.2.3.5)
                try:
                    response_topic = value.decode("utf-8")
                except UnicodeDecodeError:
                    return None
            elif ident == _CORRELATION_DATA:
                if correlation is not None:
                    return None  # at most once (3.3.2.3.6)
                correlation = value
        elif ident == _USER_PROPERTY:
            for _ in range(2):
                field = _field(data, at, end)
                if field is None:
                    return None
                at = field[1]
        else:
            return None
    if at != end:
        return None  # a value ran past the block's stated length
    return end, response_topic, correlation


def _field(data: bytes, at: int, end: int) -> tuple[bytes, int] | None:
    """A two-byte length and that many bytes, within `end`."""
    if at + 2 > end:
        return None
    stop = at + 2 + int.from_bytes(data[at : at + 2], "big")
    if stop > end:
        return None
    return data[at + 2 : stop], stop


def _variable_int(data: bytes, at: int) -> tuple[int, int] | None:
    """MQTT's Variable Byte Integer (1.5.5) at `at`: its value and where it ends."""
    value = 0
    for shift in range(0, 28, 7):
        if at >= len(data):
            return None
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
    return None  # more than four bytes
