"""sd_notify against a real datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqtt_starter.ops.systemd import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def test_ready_status_stopping(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.ready("serving")
    notifier.status("busy")
    notifier.stopping()
    assert [sock.recv(1024).decode() for _ in range(3)] == [
        "READY=1\nSTATUS=serving",
        "STATUS=busy",
        "STOPPING=1\nSTATUS=stopping",
    ]


def test_abstract_socket_address() -> None:
    name = f"mqtt-starter-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready("ok")
        assert sock.recv(1024) == b"READY=1\nSTATUS=ok"


def test_nothing_without_notify_socket() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("no-op")  # must neither fail nor block


def test_a_vanished_socket_is_not_fatal(tmp_path: Path) -> None:
    Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).ready("ok")


async def test_watchdog_pings_at_half_the_interval(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    sock.setblocking(False)
    notifier = Notifier(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert notifier.watchdog_s == 0.2
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(notifier.watchdog())
    try:
        # Each read has its own deadline: a ping that never comes fails the test.
        pings = [await asyncio.wait_for(loop.sock_recv(sock, 1024), 5) for _ in range(3)]
    finally:
        task.cancel()
    assert pings == [b"WATCHDOG=1"] * 3


def test_watchdog_of_another_process_is_ignored() -> None:
    notifier = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert notifier.watchdog_s is None
