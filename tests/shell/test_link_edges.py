"""The broker connection at its edges, against a server that accepts TCP and says nothing."""

from __future__ import annotations

import asyncio
import contextlib

from mqtt_starter.config import MqttSettings
from mqtt_starter.mqtt.link import Incoming, MqttLink


async def test_a_link_stopped_while_it_waits_for_connack_leaves_no_unseen_error() -> None:
    connect_sent = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # kept open: no CONNACK ever comes
        await reader.read(1)  # the CONNECT packet's first byte
        connect_sent.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def handler(_message: Incoming) -> None:
        raise AssertionError("nothing can arrive")

    link = MqttLink(MqttSettings(host="127.0.0.1", port=port), ["butler/start/#"], "b/avail")
    running = asyncio.create_task(link.run(handler))
    try:
        async with asyncio.timeout(30):
            await connect_sent.wait()
        connection = link._connection
        assert connection is not None
    finally:
        running.cancel()  # as the daemon's task group does when it stops
        with contextlib.suppress(asyncio.CancelledError):
            await running
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    # Closing the connection failed its CONNACK future, which nobody awaits any more: unless
    # marked as seen, asyncio logs "Future exception was never retrieved" whenever the
    # future is collected (in a later test, or at exit).
    connack = connection._connack
    assert connack.done()
    assert not connack._log_traceback  # before .exception(), which would mark it seen
    assert isinstance(connack.exception(), Exception)
