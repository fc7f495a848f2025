"""The link's reads as paho relies on them: one `recv` takes what the socket has, and paho's
small reads are served from it, never more than asked, in order, across packets."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from paho.mqtt.enums import CallbackAPIVersion

from mqtt_starter.mqtt.link import _Client


@pytest.fixture
def pair() -> Iterator[tuple[_Client, socket.socket]]:
    """A client reading one end of a socket pair; the test writes to the other."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client = _Client(CallbackAPIVersion.VERSION2, client_id="reads")
    client._sock = ours
    yield client, theirs
    ours.close()
    theirs.close()


def test_small_reads_are_served_from_one_recv(pair: tuple[_Client, socket.socket]) -> None:
    client, theirs = pair
    theirs.sendall(b"\x30\x05hello\x40\x02")  # a packet and the start of the next
    assert client._sock_recv(1) == b"\x30"
    assert client.buffered()
    assert client._sock_recv(1) == b"\x05"
    assert client._sock_recv(2048) == b"hello\x40\x02"  # what is here, no more
    assert not client.buffered()
    with pytest.raises(BlockingIOError):  # the socket is empty: paho stops reading
        client._sock_recv(1)
    theirs.sendall(b"\x00\x01")  # the rest arrives later
    assert client._sock_recv(1) == b"\x00"
    assert client._sock_recv(1) == b"\x01"
    assert not client.buffered()


def test_a_read_that_fits_is_given_whole(pair: tuple[_Client, socket.socket]) -> None:
    client, theirs = pair
    theirs.sendall(b"abc")
    assert client._sock_recv(3) == b"abc"
    assert not client.buffered()


def test_the_broker_closing_reads_as_nothing(pair: tuple[_Client, socket.socket]) -> None:
    client, theirs = pair
    theirs.sendall(b"ab")
    theirs.shutdown(socket.SHUT_WR)
    assert client._sock_recv(1) == b"a"
    assert client._sock_recv(1) == b"b"
    assert client._sock_recv(1) == b""  # paho reads this as the connection lost
