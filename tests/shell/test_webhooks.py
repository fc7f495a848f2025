"""A webhook lane against a real receiver on loopback, in-process: the per-task interval and
the bounded queue, with a clock of the test's own (no wall-clock windows)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from loguru import logger
from prometheus_client.parser import text_string_to_metric_families

from mqtt_starter.config import Settings, settings_from_mapping
from mqtt_starter.core.model import TaskRef
from mqtt_starter.ops.metrics import Metrics
from mqtt_starter.ops.webhooks import Webhooks
from tests.conftest import wait_until
from tests.receiver import Receiver, receiving

HR = TaskRef(id="t-hr", name="Reload HR")
STOCK = TaskRef(id="t-stock", name="Reload Stock")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving() as got:
        yield got


def settings(url: str, **hook: Any) -> Settings:
    return settings_from_mapping(
        {"qrs": {"url": "https://sense:4242"}, "monitor": {"enabled": True},
         "alerts": {"webhooks": [{"name": "ops", "url": url, **hook}]}}, {})  # fmt: skip


def event(task: TaskRef, n: int) -> dict[str, Any]:
    return {"taskId": task.id, "taskName": task.name, "executionId": f"e-{n}", "reason": ""}


def counted(metrics: Metrics) -> dict[str, float]:
    return {
        s.labels["outcome"]: s.value
        for f in text_string_to_metric_families(metrics.render().decode())
        for s in f.samples
        if s.name == "mqtt_starter_webhook_deliveries_total"
    }


async def test_the_per_task_interval_holds_alerts_back_and_counts_them_in_the_next(
    receiver: Receiver,
) -> None:
    got, url = receiver, receiver.url
    now = [1000.0]
    current = settings(url, per_task_interval_s=600)
    hooks = Webhooks(lambda: current, clock=lambda: now[0])
    try:
        hooks.run_ended("failed", HR, event(HR, 1))
        now[0] += 10
        hooks.run_ended("failed", HR, event(HR, 2))  # held back
        hooks.run_ended("aborted", HR, event(HR, 3))  # held back
        hooks.run_ended("failed", STOCK, event(STOCK, 4))  # another task: its own interval
        hooks.run_ended("succeeded", STOCK, event(STOCK, 5))  # not among the events
        now[0] += 600
        hooks.run_ended("failed", HR, event(HR, 6))
        await wait_until(lambda: len(got.bodies()) == 3, what="three deliveries")
        assert [(b["executionId"], b.get("heldBack")) for b in got.bodies()] == [
            ("e-1", None),
            ("e-4", None),
            ("e-6", 2),
        ]
    finally:
        await hooks.close()


async def test_a_full_queue_drops_its_oldest_and_counts_it(
    receiver: Receiver,
) -> None:
    got, url = receiver, receiver.url
    got.answers = ["hang"] * 5  # the receiver hangs until released
    metrics = Metrics()
    current = settings(url, queue_max=2)
    shown: list[list[dict[str, Any]]] = []
    hooks = Webhooks(lambda: current, metrics, on_change=shown.append)
    try:
        hooks.run_ended("failed", HR, event(HR, 1))
        await wait_until(lambda: len(got.bodies()) == 1, what="the first POST to hang")
        for n in (2, 3, 4, 5):
            hooks.run_ended("failed", HR, event(HR, n))
        assert hooks.lanes()["ops"].waiting == 2
        assert counted(metrics) == {"dropped": 2.0}
        got.release.set()
        await wait_until(lambda: len(got.bodies()) == 3, what="the queued deliveries")
        assert [b["executionId"] for b in got.bodies()] == ["e-1", "e-4", "e-5"]
        await wait_until(lambda: counted(metrics).get("delivered") == 3.0, what="counters")
        # The status page's view of the webhook: counts, what waits, no URL.
        assert shown[-1] == [{"name": "ops", "delivered": 3, "failed": 0, "dropped": 2,
                              "waiting": 0, "lastFailure": ""}]  # fmt: skip
    finally:
        await hooks.close()


async def test_a_refusal_is_shown_with_the_receivers_answer(receiver: Receiver) -> None:
    receiver.answers = [400]
    shown: list[list[dict[str, Any]]] = []
    current = settings(receiver.url)
    hooks = Webhooks(lambda: current, on_change=shown.append)
    try:
        hooks.run_ended("failed", HR, event(HR, 1))
        await wait_until(lambda: bool(shown), what="the refusal")
        refused = "HTTP 400: no such channel"
        assert shown[-1] == [{"name": "ops", "delivered": 0, "failed": 1, "dropped": 0,
                              "waiting": 0, "lastFailure": refused}]  # fmt: skip
        assert len(receiver.got) == 1
    finally:
        await hooks.close()


async def test_a_stop_says_what_was_not_sent(receiver: Receiver) -> None:
    receiver.answers = ["hang"]
    current = settings(receiver.url)
    hooks = Webhooks(lambda: current)
    said: list[str] = []
    sink = logger.add(lambda m: said.append(m.record["message"]), level="WARNING")
    try:
        hooks.run_ended("failed", HR, event(HR, 1))
        await wait_until(lambda: len(receiver.got) == 1, what="the POST to hang")
        hooks.run_ended("failed", HR, event(HR, 2))
        await hooks.close()
    finally:
        logger.remove(sink)
    assert said == ["webhook ops: 2 deliveries not sent at the stop"]
