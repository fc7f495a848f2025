"""The request service in-process, against fakes of the backend and the publisher."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mqtt_starter.config import Settings, settings_from_mapping
from mqtt_starter.core.codec import encode_reply
from mqtt_starter.core.model import (
    Reply,
    Request,
    Selector,
    SelectorKind,
    StartResult,
    TaskRef,
    TaskResult,
    TaskStatus,
)
from mqtt_starter.ops.metrics import Metrics
from mqtt_starter.service.parts import Parts, allow_list, build_rules
from mqtt_starter.service.requests import Inbound, Starter
from tests.conftest import LoggedExceptions, wait_until
from tests.fakes import FAILURE, FakeBackend, FakePublisher

SALES = TaskRef(id="11111111-1111-4111-8111-111111111111", name="Reload Sales", tags=("Nightly",))
STOCK = TaskRef(id="22222222-2222-4222-8222-222222222222", name="Reload Stock", tags=("Nightly",))
ID_SALES = Selector(SelectorKind.ID, SALES.id)
ID_STOCK = Selector(SelectorKind.ID, STOCK.id)
FORECAST = TaskRef(id="33333333-3333-4333-8333-333333333333", name="Forecast", tags=("Fragile",))
TAG = Selector(SelectorKind.TAG, "Nightly")


def settings(**sections: Any) -> Settings:
    data: dict[str, Any] = {
        "qrs": {"url": "https://sense:4242", "poll_interval_s": 0.001},
        "mqtt": {"client_id": "me"},
    }
    data.update(sections)
    return settings_from_mapping(data, {})


class Harness:
    """A request service on a fake backend, with its spawned follow-ups tracked."""

    def __init__(self, backend: FakeBackend, config: Settings) -> None:
        self.backend = backend
        self.parts = Parts(config, backend, build_rules(config), allow_list(config.policy))
        self.publisher = FakePublisher()
        self.metrics = Metrics()
        self.tasks: list[asyncio.Task[Any]] = []
        self.finished: list[Reply] = []
        self.starter = Starter(lambda: self.parts, self.publisher, self.metrics, self.spawn)

    def spawn(self, coroutine: Any, name: str) -> None:
        self.tasks.append(asyncio.create_task(coroutine, name=name))

    async def ask(self, *selectors: Selector, wait: bool = False, **fields: Any) -> Reply:
        request = Request(tuple(selectors) or (TAG,), wait=wait, **fields)
        return await self.starter.handle(
            Inbound(request, door="mqtt", topic="butler/start", kind="payload"),
            on_finished=self.collect,
        )

    async def collect(self, reply: Reply) -> None:
        self.finished.append(reply)

    async def settle(self) -> None:
        """Every follow-up spawned so far (and those they spawn) has ended."""
        while not all(t.done() for t in self.tasks):
            await asyncio.wait_for(asyncio.gather(*self.tasks), 10)

    def count(self, kind: str, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "mqtt_starter_triggers_total", {"kind": kind, "outcome": outcome}
        )
        return value or 0.0


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness(FakeBackend.of(SALES, STOCK, FORECAST), settings())
    yield h
    for task in h.tasks:
        task.cancel()
    await asyncio.gather(*h.tasks, return_exceptions=True)


def answer(reply: Reply) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(encode_reply(reply, "me"))
    return data


async def test_a_request_starts_its_tasks_logs_and_counts(
    harness: Harness, logged: list[str]
) -> None:
    reply = await harness.ask(request_id="r1")
    assert answer(reply) == {
        "requestId": "r1",
        "status": "ok",
        "stage": "accepted",
        "tasks": [
            {
                "taskId": SALES.id,
                "taskName": "Reload Sales",
                "matchedBy": ["tag:Nightly"],
                "result": "started",
                "executionId": "00000000-0000-4000-8000-000000000000",
            },
            {
                "taskId": STOCK.id,
                "taskName": "Reload Stock",
                "matchedBy": ["tag:Nightly"],
                "result": "started",
                "executionId": "00000000-0000-4000-8000-000000000001",
            },
        ],
        "unmatched": [],
        "instance": "me",
    }
    assert harness.backend.started() == [SALES.id, STOCK.id]
    [line] = [m for m in logged if m.startswith("request ")]
    assert line.startswith("request mqtt butler/start requestId=r1 -> ok started=2 unmatched=0 in ")
    assert harness.count("payload", "accepted") == 1


async def test_status_events_and_the_finished_reply(harness: Harness) -> None:
    harness.backend.scripts[FORECAST.id] = FAILURE
    reply = await harness.ask(Selector(SelectorKind.NAME, "Forecast"), wait=True, request_id="w")
    await harness.settle()
    [finished] = harness.finished
    execution_id = reply.outcomes[0].execution_id
    assert answer(finished)["tasks"] == [
        {
            "taskId": FORECAST.id,
            "taskName": "Forecast",
            "matchedBy": ["name"],
            "result": "started",
            "executionId": execution_id,
            "state": "FinishedFail",
            "stateCode": 8,
            "durationMs": 100,
            "reason": "",
        }
    ]
    assert (finished.stage, finished.status.value) == ("finished", "error")
    topics = {t for t, _ in harness.publisher.sent}
    assert topics == {f"butler/status/task/{FORECAST.id}"}
    events = [json.loads(p) for _, p in harness.publisher.sent]
    assert [e["state"] for e in events] == ["Triggered", "Started", "FinishedFail"]
    assert {(e["requestId"], e["startedBy"], e["executionId"]) for e in events} == {
        ("w", "mqtt-starter", execution_id)
    }


async def test_a_repeated_request_id_is_replayed_and_starts_nothing(
    harness: Harness, logged: list[str]
) -> None:
    first = await harness.ask(request_id="once")
    again = await harness.ask(request_id="once")
    assert again.replayed and not first.replayed
    assert answer(again) == {**answer(first), "replayed": True}
    assert harness.backend.started() == [SALES.id, STOCK.id]
    assert any(" -> ok (replayed) started=2 " in m for m in logged)


async def test_a_replayed_wait_still_gets_its_finished_reply(harness: Harness) -> None:
    await harness.ask(request_id="w", wait=True)
    replayed = await harness.ask(request_id="w", wait=True)
    await harness.settle()
    assert replayed.replayed
    first, second = harness.finished
    assert (first.stage, first.replayed, second.stage, second.replayed) == (
        "finished",
        False,
        "finished",
        True,
    )
    assert answer(second) == {**answer(first), "replayed": True}
    assert len(harness.backend.started()) == 2


async def test_a_replayed_wait_follows_runs_the_first_did_not(harness: Harness) -> None:
    harness.parts = Parts(
        settings(status={"publish_task_events": False}),
        harness.backend,
        harness.parts.rules,
        None,
    )
    await harness.ask(request_id="w")  # no wait, no events: nothing followed
    assert harness.tasks == []
    await harness.ask(request_id="w", wait=True)
    await harness.settle()
    [finished] = harness.finished
    assert finished.replayed and finished.status.value == "ok"
    assert len(harness.backend.started()) == 2


async def test_the_same_request_id_at_once_when_the_first_fails(
    harness: Harness, logged_exceptions: LoggedExceptions
) -> None:
    logged_exceptions.expect()  # the first one's bug
    harness.backend.gate = asyncio.Event()
    harness.backend.broken = 1
    first = asyncio.create_task(harness.ask(request_id="twice"))
    second = asyncio.create_task(harness.ask(request_id="twice"))
    await wait_until(lambda: harness.backend.waiting == 1, what="the first to wait on QRS")
    harness.backend.gate.set()
    one, two = await asyncio.gather(first, second)
    assert one.error is not None and one.error.code == "internal"
    # The second waited for the first instead of querying at the same time, then queried.
    assert [name for name, _ in harness.backend.calls][:2] == ["find_tasks", "find_tasks"]
    # The second is served in its own right, not left with a CancelledError.
    assert two.status.value == "ok" and not two.replayed
    assert harness.backend.started() == [SALES.id, STOCK.id]


async def test_the_same_request_id_at_once_is_answered_once(harness: Harness) -> None:
    harness.backend.gate = asyncio.Event()
    first = asyncio.create_task(harness.ask(request_id="twice"))
    second = asyncio.create_task(harness.ask(request_id="twice"))
    await wait_until(lambda: harness.backend.waiting == 1, what="the first to wait on QRS")
    harness.backend.gate.set()
    one, two = await asyncio.gather(first, second)
    assert (one.replayed, two.replayed) == (False, True)
    assert [name for name, _ in harness.backend.calls].count("find_tasks") == 1
    assert harness.backend.started() == [SALES.id, STOCK.id]


async def test_a_passing_refusal_is_not_remembered(harness: Harness) -> None:
    harness.backend.unavailable = 1
    refused = await harness.ask(request_id="later")
    assert refused.error is not None and refused.error.code == "qrs_unavailable"
    served = await harness.ask(request_id="later")
    assert served.status.value == "ok" and not served.replayed


async def test_debounce(harness: Harness) -> None:
    inbound = Inbound(
        Request((TAG,)), door="mqtt", topic="f/1", kind="route", debounce_key="k", debounce_s=60
    )
    first = await harness.starter.handle(inbound)
    second = await harness.starter.handle(inbound)
    assert first.status.value == "ok" and len(first.outcomes) == 2
    assert second.outcomes == () and second.notes == ("debounced: started less than 60s ago",)
    assert harness.backend.started() == [SALES.id, STOCK.id]


@pytest.mark.parametrize(
    ("selectors", "message"),
    [
        (
            [Selector(SelectorKind.TAG, f"t{i}") for i in range(101)],
            "101 selectors; the limit is 100",
        ),
        (
            [Selector(SelectorKind.TAG, "x" * 301)],
            "tag:" + "x" * 56 + "...: a selector value may have at most 300 characters",
        ),
    ],
)
async def test_limits(harness: Harness, selectors: list[Selector], message: str) -> None:
    reply = await harness.ask(*selectors)
    assert reply.error is not None and reply.error.message == message
    assert harness.backend.calls == []


async def test_too_many_tasks_after_resolution(harness: Harness) -> None:
    harness.parts = Parts(
        settings(policy={"max_tasks_per_request": 1}), harness.backend, harness.parts.rules, None
    )
    reply = await harness.ask()
    assert reply.error is not None
    assert (reply.error.code, reply.error.message) == (
        "too_many_tasks",
        "the selectors match 2 tasks; the limit is 1",
    )
    assert harness.backend.started() == []


async def test_results_other_than_started(harness: Harness) -> None:
    harness.backend.refusals[STOCK.id] = StartResult(TaskResult.UNKNOWN, error="lost")
    reply = await harness.ask(wait=True)
    await harness.settle()
    assert [o.result for o in reply.outcomes] == [TaskResult.STARTED, TaskResult.UNKNOWN]
    assert reply.status.value == "partial"
    [finished] = harness.finished
    assert finished.status.value == "partial"
    assert answer(finished)["tasks"][1] == {
        "taskId": STOCK.id,
        "taskName": "Reload Stock",
        "matchedBy": ["tag:Nightly"],
        "result": "unknown",
        "error": "lost",
    }


async def test_a_follow_up_keeps_retired_parts_open(harness: Harness) -> None:
    harness.backend.scripts[SALES.id] = (TaskStatus.STARTED,) * 50 + (TaskStatus.FINISHED_SUCCESS,)
    await harness.ask(Selector(SelectorKind.ID, SALES.id), wait=True)
    old = harness.parts
    await old.retire()  # a reload swapped the parts while the run is followed
    assert not harness.backend.closed
    await harness.settle()
    assert harness.backend.closed  # closed once the follower let go
    [finished] = harness.finished
    assert finished.status.value == "ok"


async def test_a_bug_is_answered_internal_and_logged(
    harness: Harness, logged: list[str], logged_exceptions: LoggedExceptions
) -> None:
    assert logged_exceptions.expect() == []
    harness.backend.broken = 1
    reply = await harness.ask(request_id="bug")
    assert reply.error is not None
    assert (reply.error.code, reply.error.message) == (
        "internal",
        "internal error; the daemon's log has the details",
    )
    assert "request on butler/start failed" in logged
    assert logged_exceptions.records == [
        "mqtt_starter.service.requests: request on butler/start failed"
    ]
    assert harness.count("payload", "refused") == 1


async def test_a_reload_during_a_request_keeps_its_follower_on_the_old_parts(
    harness: Harness,
) -> None:
    old_backend = harness.backend
    old_backend.gate = asyncio.Event()
    request = asyncio.create_task(harness.ask(Selector(SelectorKind.ID, SALES.id), wait=True))
    await wait_until(lambda: old_backend.waiting == 1, what="the request to wait on QRS")
    old = harness.parts
    new_backend = FakeBackend.of(SALES)
    harness.parts = Parts(old.settings, new_backend, old.rules, None)
    await old.retire()
    assert not old_backend.closed  # the request in flight still uses it
    old_backend.gate.set()
    reply = await request
    await harness.settle()
    [finished] = harness.finished
    assert (reply.status.value, finished.status.value) == ("ok", "ok")
    assert old_backend.closed and not new_backend.closed
    assert new_backend.calls == []


async def test_the_same_request_id_with_another_request_is_served(
    harness: Harness, logged: list[str]
) -> None:
    # Two devices that both count from 1, on their own topics and selectors.
    first = await harness.starter.handle(
        Inbound(Request((ID_SALES,), request_id="1"), "mqtt", "butler/start/id/a", "id")
    )
    second = await harness.starter.handle(
        Inbound(Request((ID_STOCK,), request_id="1"), "mqtt", "butler/start/id/b", "id")
    )
    assert not first.replayed and not second.replayed
    assert harness.backend.started() == [SALES.id, STOCK.id]
    assert (
        "requestId=1 came before with another request (mqtt butler/start/id/b): served as a new one"
    ) in logged
    # The same request on another topic is another request too.
    other_topic = await harness.starter.handle(
        Inbound(Request((ID_SALES,), request_id="1"), "mqtt", "factory/line-2/done", "route")
    )
    assert not other_topic.replayed
    assert harness.backend.started() == [SALES.id, STOCK.id, SALES.id]
    # The very same request again is a repeat.
    again = await harness.starter.handle(
        Inbound(Request((ID_STOCK,), request_id="1"), "mqtt", "butler/start/id/b", "id")
    )
    assert again.replayed
    assert harness.backend.started() == [SALES.id, STOCK.id, SALES.id]


async def test_where_the_reply_goes_and_waiting_do_not_make_another_request(
    harness: Harness,
) -> None:
    await harness.ask(request_id="r", reply_to="a/reply")
    again = await harness.ask(request_id="r", reply_to="b/reply", wait=True)
    assert again.replayed
    assert len(harness.backend.started()) == 2


async def test_the_request_id_memory_keeps_at_most_dedupe_max_entries() -> None:
    h = Harness(FakeBackend.of(SALES, STOCK), settings(policy={"dedupe_max_entries": 2}))
    for request_id in ("a", "b", "c"):
        await h.ask(ID_SALES, request_id=request_id)
    assert (await h.ask(ID_SALES, request_id="c")).replayed
    assert (await h.ask(ID_SALES, request_id="b")).replayed
    assert not (await h.ask(ID_SALES, request_id="a")).replayed  # the oldest went first
    assert h.backend.started() == [SALES.id] * 4
    for task in h.tasks:
        task.cancel()
    await asyncio.gather(*h.tasks, return_exceptions=True)


async def test_a_long_topic_is_cut_in_the_log_line(harness: Harness, logged: list[str]) -> None:
    topic = "butler/start/name/" + "x" * 5000
    await harness.starter.handle(Inbound(Request((ID_SALES,)), "mqtt", topic, "name"))
    [line] = [m for m in logged if m.startswith("request mqtt")]
    assert f"request mqtt {topic[:200]}... requestId=None -> ok" in line
    assert len(line) < 400
