"""The MQTT door, the held publications and the dispatch of the link's messages, in-process:
a fake link stands for the broker, a fake backend for the site; every publish is asserted."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mqtt_starter.doors.mqtt import MqttDoor, ReplyPublisher
from mqtt_starter.doors.status_board import StatusBoard
from mqtt_starter.instance import Instance
from mqtt_starter.mqtt.link import Incoming
from mqtt_starter.ops.metrics import Metrics
from mqtt_starter.ops.systemd import Notifier
from mqtt_starter.service.parts import Parts, allow_list, build_rules
from mqtt_starter.service.requests import Starter
from mqtt_starter.wiring import wire
from tests.fakes import FakeBackend, FakeLink, Published
from tests.shell.test_starter import SALES, STOCK, settings


class Door:
    """A door on a fake link and a fake backend, its follow-ups tracked."""

    def __init__(self, link: FakeLink, **sections: Any) -> None:
        config = settings(**sections)
        self.backend = FakeBackend.of(SALES, STOCK)
        self.parts = Parts(config, self.backend, build_rules(config), allow_list(config.policy))
        self.link = link
        self.publisher = ReplyPublisher(lambda: link, hold_max=3)
        self.tasks: list[asyncio.Task[Any]] = []
        self.starter = Starter(lambda: self.parts, self.publisher, Metrics(), self.spawn)

        async def health(request_id: str | None) -> bytes:
            return json.dumps({"healthy": True, "requestId": request_id}).encode()

        self.door = MqttDoor(lambda: self.parts, self.starter, self.publisher, health=health)

    def spawn(self, coroutine: Any, name: str) -> None:
        self.tasks.append(asyncio.create_task(coroutine, name=name))

    async def receive(self, topic: str, payload: bytes = b"", **options: Any) -> None:
        await self.door.on_message(Incoming(topic, payload, **{"retain": False, **options}))

    async def settle(self) -> None:
        while not all(t.done() for t in self.tasks):
            await asyncio.wait_for(asyncio.gather(*self.tasks), 10)


@pytest.fixture
async def door() -> AsyncIterator[Door]:
    d = Door(FakeLink(), status={"publish_task_events": False})
    yield d
    for task in d.tasks:
        task.cancel()
    await asyncio.gather(*d.tasks, return_exceptions=True)


async def test_a_request_is_answered_on_its_response_topic_with_its_correlation(
    door: Door,
) -> None:
    await door.receive(
        f"butler/start/id/{SALES.id}",
        b'{"requestId": "r-1"}',
        response_topic="app/replies",
        correlation_data=b"c-1",
    )
    [reply] = door.link.published
    assert (reply.topic, reply.retain, reply.correlation_data) == ("app/replies", False, b"c-1")
    assert reply.json() == {
        "requestId": "r-1",
        "status": "ok",
        "stage": "accepted",
        "tasks": [
            {
                "taskId": SALES.id,
                "taskName": "Reload Sales",
                "matchedBy": ["id"],
                "result": "started",
                "executionId": "00000000-0000-4000-8000-000000000000",
            }
        ],
        "unmatched": [],
        "instance": "me",
    }
    assert door.backend.started() == [SALES.id]


async def test_a_refusal_goes_to_the_default_reply_topic(door: Door) -> None:
    await door.receive("butler/start", b"{not json")
    assert door.link.published == [
        Published(
            "butler/reply/start",
            json.dumps(
                {
                    "requestId": None,
                    "status": "error",
                    "stage": "accepted",
                    "error": {
                        "code": "bad_payload",
                        "message": "invalid JSON: Expecting property name enclosed in double"
                        " quotes: line 1 column 2 (char 1)",
                    },
                    "instance": "me",
                },
                separators=(",", ":"),
            ).encode(),
        )
    ]
    assert door.backend.started() == []


async def test_a_retained_trigger_and_its_clearing_publish_and_start_nothing(
    door: Door,
) -> None:
    await door.receive(f"butler/start/id/{SALES.id}", b"{}", retain=True)
    await door.receive(f"butler/start/id/{SALES.id}", b"", retain=True)
    assert door.link.published == []
    assert door.backend.started() == []


async def test_a_health_check_is_answered_with_the_health(door: Door) -> None:
    await door.receive("butler/request/health", b'{"requestId": "h"}', response_topic="ops/health")
    assert door.link.published == [Published("ops/health", b'{"healthy": true, "requestId": "h"}')]


async def test_the_finished_reply_follows_the_accepted_one() -> None:
    d = Door(FakeLink())
    try:
        await d.receive(
            f"butler/start/id/{SALES.id}", b'{"requestId": "w", "wait": true}',
            response_topic="app/w",
        )  # fmt: skip
        await d.settle()
        replies = [p.json() for p in d.link.on("app/w")]
        assert [(r["stage"], r["status"]) for r in replies] == [
            ("accepted", "ok"),
            ("finished", "ok"),
        ]
        assert replies[1]["tasks"][0]["state"] == "FinishedSuccess"
        # Status events went out between them, each in order.
        states = [p.json()["state"] for p in d.link.on(f"butler/status/task/{SALES.id}")]
        assert states == ["Triggered", "Started", "FinishedSuccess"]
    finally:
        for task in d.tasks:
            task.cancel()
        await asyncio.gather(*d.tasks, return_exceptions=True)


# -- held publications -------------------------------------------------------------------------


async def test_what_the_broker_cannot_take_is_held_in_order_and_published_after() -> None:
    link = FakeLink(connected=False)
    publisher = ReplyPublisher(lambda: link, hold_max=3)
    for i in range(4):
        await publisher.publish(f"t/{i}", b"x")
    assert (publisher.held, publisher.dropped, link.published) == (3, 1, [])
    link.up()
    # Connected again, but something is held: this one queues behind it (order is kept),
    # and the bound still holds (the oldest goes).
    await publisher.publish("t/4", b"x")
    assert (publisher.held, publisher.dropped, link.published) == (3, 2, [])
    await publisher.flush()
    assert [p.topic for p in link.published] == ["t/2", "t/3", "t/4"]
    assert publisher.held == 0
    await publisher.publish("t/5", b"x")  # nothing held: straight through
    assert link.published[-1].topic == "t/5"


async def test_a_publish_the_broker_drops_is_held_not_lost() -> None:
    link = FakeLink()
    publisher = ReplyPublisher(lambda: link)
    link.refuse_next = 1
    await publisher.publish("a", b"1", retain=True, correlation_data=b"c")
    assert link.published == [] and publisher.held == 1
    await publisher.flush()
    assert link.published == [Published("a", b"1", True, b"c")]


# -- the dispatch of the link's messages --------------------------------------------------------


async def test_the_dispatch_routes_each_topic_to_its_owner_and_announces_on_connect() -> None:
    config = settings(monitor={"enabled": True}, status={"publish_task_events": False})
    backend = FakeBackend.of(SALES, STOCK)
    parts = Parts(config, backend, build_rules(config), allow_list(config.policy))
    link = FakeLink()
    tasks: list[asyncio.Task[Any]] = []

    def spawn(coroutine: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine, name=name)
        tasks.append(task)
        return task

    board = StatusBoard("butler", {})
    instance = Instance(lambda: config, lambda: parts, lambda: link, board, Notifier({}), spawn)
    wired = wire(config, lambda: config, lambda: parts, lambda: link, instance, Metrics(), spawn,
                 lambda: None)  # fmt: skip
    dispatch = wired.dispatch
    try:
        assert dispatch.private_topics() == [
            "butler/wait/me/+",
            "butler/following/me/+",
            "butler/sync/me/waits",
            "butler/availability/+",
            "butler/info/+",
            "butler/state/task/+",
            "butler/claim/+",
            "butler/sync/me",
        ]
        # A peer's availability goes to the monitor's election; a request to the door.
        await dispatch.on_message(Incoming("butler/availability/other", b"online", True))
        assert wired.monitor.election.peers["other"].online
        await dispatch.on_message(
            Incoming(f"butler/start/id/{SALES.id}", b"", False, response_topic="app/r")
        )
        [reply] = link.published
        assert (reply.topic, reply.json()["tasks"][0]["result"]) == ("app/r", "started")
        # A connect: the info once the site answered, then the markers of the memory and
        # of the monitor, each to this instance alone.
        link.published.clear()
        instance.qrs_ready.set()
        dispatch.on_connect()
        await asyncio.gather(*tasks)
        assert [(p.topic, p.retain) for p in link.published] == [
            ("butler/info/me", True),
            ("butler/sync/me/waits", False),
            ("butler/sync/me", False),
        ]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
