"""No trigger lost: daemon killed, broker restarted, graceful stop with a request in flight."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_starter.simulators.qrs.fixtures import Fixture
from mqtt_starter.simulators.qrs.state import SimState
from tests.conftest import wait_until
from tests.integration.conftest import AiomqttClient, Broker, Client
from tests.integration.helpers import many_task_ids, many_tasks

BULK = many_task_ids(20, 0xB0)

# Every promise here holds on both event loops the daemon may run on.
pytestmark = pytest.mark.usefixtures("daemon_loop")


@pytest.fixture
def broker(private_broker: Broker) -> Broker:
    """These tests stop or kill the broker: each has one of its own."""
    return private_broker


@pytest.fixture(scope="module")
def task_fixture() -> Fixture:
    return many_tasks("Bulk", 20, 0xB0, duration_s=0.05)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_triggers_waiting_while_the_daemon_is_dead_are_all_served(
    make_daemon: Any, mqtt: Client, sim_state: SimState, protocol: str
) -> None:
    daemon = await make_daemon(mqtt={"protocol": protocol})
    await daemon.kill()  # SIGKILL: no clean disconnect, the session stays
    # The broker publishes the Last Will for the dead connection.
    await mqtt.subscribe("butler/availability/starter-test")
    await wait_until(
        lambda: [m.payload for m in mqtt.on("butler/availability/#")][-1:] == [b"offline"],
        what="the Last Will",
    )
    await mqtt.subscribe("butler/reply/#")
    for i in range(20):
        await mqtt.publish(f"butler/start/name/Bulk {i:03d}", {"requestId": f"kill-{i}"})
    await daemon.start()
    replies = await mqtt.wait_for("butler/reply/start/name/#", 20)
    assert sorted(r.json()["requestId"] for r in replies) == sorted(f"kill-{i}" for i in range(20))
    assert {r.json()["status"] for r in replies} == {"ok"}
    assert sorted(sim_state.started) == sorted(BULK)  # every task once, none twice


async def test_a_trigger_unacknowledged_at_a_crash_is_delivered_again(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    daemon = await make_daemon()
    sim_state.faults.delay_s = 30  # QRS hangs: the trigger is in flight, not acknowledged
    await mqtt.subscribe("butler/reply/#")
    await mqtt.publish(f"butler/start/id/{BULK[3]}", {"requestId": "crash"})
    await wait_until(
        lambda: any(e.path == "/qrs/task/full" for e in sim_state.journal),
        what="the trigger to reach QRS",
    )
    await daemon.kill()
    sim_state.faults.delay_s = 0
    await daemon.start()
    [answer] = await mqtt.wait_for(f"butler/reply/start/id/{BULK[3]}")
    assert answer.json()["requestId"] == "crash"
    assert answer.json()["status"] == "ok"
    assert sim_state.started == [BULK[3]]


async def test_broker_restart_the_daemon_reconnects_and_serves(
    make_daemon: Any, broker: Broker, sim_state: SimState
) -> None:
    daemon = await make_daemon()
    broker.stop()
    broker.start()
    async with Client(broker) as client:
        answer = await client.request(f"butler/start/id/{BULK[0]}", {"requestId": "after"})
        assert answer["status"] == "ok"
        await client.subscribe("butler/availability/starter-test")
        [online] = await client.wait_for("butler/availability/starter-test")
        assert (online.payload, online.retain) == (b"online", True)
    assert daemon.log.count("connected to broker") == 2
    assert sim_state.started == [BULK[0]]


async def test_sigterm_finishes_the_request_in_flight_then_says_offline(
    make_daemon: Any, broker: Broker, mqtt: Client, sim_state: SimState
) -> None:
    daemon = await make_daemon()
    sim_state.faults.delay_s = 0.5
    await mqtt.subscribe("test/in-flight")
    await mqtt.publish(
        "butler/start/tag/bulk", {"requestId": "in-flight"}, response_topic="test/in-flight"
    )
    await wait_until(
        lambda: any(e.path == "/qrs/task/full" for e in sim_state.journal),
        what="the request to reach QRS",
    )
    daemon.signal(signal.SIGTERM)
    [answer] = await mqtt.wait_for("test/in-flight", timeout=30)
    assert answer.json()["status"] == "ok"
    assert len(answer.json()["tasks"]) == 20
    assert await daemon.wait() == 0
    assert daemon.notify is not None
    await daemon.notify.wait_for("STOPPING=1")
    async with Client(broker) as client:
        await client.subscribe("butler/availability/starter-test")
        [offline] = await client.wait_for("butler/availability/starter-test")
    assert (offline.payload, offline.retain) == (b"offline", True)
    assert sorted(sim_state.started) == sorted(BULK)


async def test_two_instances_share_one_subscription_group(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    first = await make_daemon(mqtt={"shared_group": "starters", "client_id": "starter-a"})
    second = await make_daemon(mqtt={"shared_group": "starters", "client_id": "starter-b"})
    await mqtt.subscribe("butler/reply/#")
    for i in range(6):
        await mqtt.publish(f"butler/start/name/Bulk {i:03d}", {"requestId": f"shared-{i}"})
    replies = await mqtt.wait_for("butler/reply/#", 6)
    assert sorted(r.json()["requestId"] for r in replies) == [f"shared-{i}" for i in range(6)]
    # Each trigger went to one member only; mosquitto deals them out round robin.
    assert {r.json()["instance"] for r in replies} == {"starter-a", "starter-b"}
    assert sorted(sim_state.started) == sorted(BULK[:6])
    assert "$share/starters/butler/start/#" in first.log
    assert "$share/starters/butler/start/#" in second.log


def persistent_client(broker: Broker) -> aiomqtt.Client:
    """A requester whose session (and what is queued for it) outlives its connection."""
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3600
    return AiomqttClient(
        "127.0.0.1",
        broker.port,
        identifier="waiter",
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=properties,
    )


async def next_message(client: aiomqtt.Client) -> Any:
    async with asyncio.timeout(30):
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            return json.loads(message.payload)
    raise AssertionError("no message")


async def test_a_finished_reply_outlives_a_broker_outage(
    make_daemon: Any, broker: Broker, sim_state: SimState
) -> None:
    daemon = await make_daemon()
    reply_topic = "test/reply/outage"
    async with persistent_client(broker) as waiter:
        await waiter.subscribe(reply_topic, qos=1)
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ResponseTopic = reply_topic
        await waiter.publish(
            f"butler/start/id/{BULK[1]}",
            json.dumps({"requestId": "outage", "wait": True}),
            qos=1,
            properties=properties,
        )
        accepted = await next_message(waiter)
        assert accepted["stage"] == "accepted"
        # QRS holds the follower's next poll while the broker goes down; the run ends meanwhile.
        sim_state.faults.open.clear()
        await wait_until(
            lambda: any(e.ended is None for e in sim_state.journal), what="a poll in flight"
        )
    broker.stop(signal.SIGKILL)
    sim_state.faults.open.set()
    await wait_until(
        lambda: f"held for the broker: {reply_topic}" in daemon.log, what="the reply held"
    )
    broker.start()
    async with persistent_client(broker) as waiter:
        finished = await next_message(waiter)
    assert (finished["requestId"], finished["stage"], finished["status"]) == (
        "outage",
        "finished",
        "ok",
    )
    assert finished["tasks"][0]["state"] == "FinishedSuccess"
    await wait_until(
        lambda: (
            "published the 1 message(s) held while the broker was away" in daemon.log
            or "published the" in daemon.log
        ),
        what="the held messages published",
    )
