"""Tests that share a broker do not see each other: each has its own base topic and client id
for the daemon (conftest.py's `broker`), so nothing needs cleaning up between them."""

from __future__ import annotations

from typing import Any

from mqtt_starter.simulators.qrs.server import QrsSimulator
from mqtt_starter.simulators.qrs.state import SimState
from tests.integration import helpers
from tests.integration.conftest import Broker, Client, LocalDaemon, daemon_config
from tests.integration.helpers import SALES, STOCK


async def test_a_test_sees_nothing_of_another_on_the_same_broker(
    make_local_daemon: Any,
    broker: Broker,
    shared_broker: Broker,
    simulator: QrsSimulator,
    sim_state: SimState,
) -> None:
    await make_local_daemon()
    other = shared_broker.namespace()
    assert (other.port, other.base != broker.base) == (broker.port, True)
    assert other.client_id != broker.client_id
    theirs = LocalDaemon(daemon_config(other, simulator))
    await theirs.start()
    try:
        async with Client(broker) as me, Client(other) as them:
            # Each daemon's retained availability is in its own namespace only.
            await me.subscribe(f"{broker.base}/#")
            await them.subscribe(f"{other.base}/#")
            [online] = await me.wait_for(f"{broker.base}/availability/+")
            assert (online.topic, online.payload) == (
                f"{broker.base}/availability/{broker.client_id}",
                b"online",
            )
            # A trigger reaches the daemon of its own namespace alone.
            assert (await them.request(f"{other.base}/start/id/{STOCK}"))["tasks"][0][
                "taskId"
            ] == STOCK
            assert (await me.request(f"{helpers.BASE}/start/id/{SALES}"))["instance"] == (
                broker.client_id
            )
            assert sim_state.started == [STOCK, SALES]
            assert not any(r.topic.startswith(other.base) for r in me.received)
            assert not any(r.topic.startswith(broker.base) for r in them.received)
    finally:
        await theirs.stop()
