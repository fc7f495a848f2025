"""The link's own packing of a reply's Correlation Data is byte for byte paho's."""

from __future__ import annotations

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_starter.mqtt.link import _CorrelationData


@pytest.mark.parametrize("size", [0, 1, 16, 122, 123, 124, 300, 16381, 16382, 65535])
def test_correlation_data_packs_as_paho_packs_it(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    theirs = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    theirs.CorrelationData = data
    assert _CorrelationData(data).pack() == theirs.pack()  # type: ignore[no-untyped-call]
