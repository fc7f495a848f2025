# ruff: noqa: F811  (the fixtures of test_monitor.py are imported, then asked for by name)
"""Webhook alerts (DESIGN.md section 10) against a real receiver on loopback: one delivery per
run end and webhook, its retries, its signature, and a receiver that hangs stopping nothing."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mqtt_starter.simulators.qrs.state import SimState
from tests.conftest import free_port, wait_until
from tests.integration import helpers
from tests.integration.conftest import Client
from tests.integration.test_monitor import (  # noqa: F401 (fixtures)
    ERROR,
    FAIL,
    OK,
    OUTSIDE,
    fire_and_end,
    make_daemon,
    metric_samples,
    monitoring,
    simulator,
    watch,
)
from tests.receiver import Receiver, receiving

SECRET = "s3cret-hmac-key"


@pytest.fixture
async def receivers() -> AsyncIterator[dict[str, Receiver]]:
    async with receiving() as ops, receiving() as chat:
        yield {"ops": ops, "chat": chat}


def hook(name: str, receiver: Receiver, **options: Any) -> dict[str, Any]:
    return {"name": name, "url": receiver.url,
            "retry": {"attempts": 4, "backoff_s": 0, "max_backoff_s": 0}, **options}  # fmt: skip


async def test_one_delivery_per_failed_run_although_the_receiver_answered_503_twice(
    make_daemon: Any, mqtt: Client, sim_state: SimState, receivers: dict[str, Receiver]
) -> None:
    ops = receivers["ops"]
    ops.answers = [503, 503]
    port = free_port()
    alerts = {"webhooks": [hook("ops", ops, secret=SECRET, headers={"X-Team": "bi"})]}
    await monitoring(
        make_daemon, mqtt, sections={"alerts": alerts, "http": {"enabled": True, "port": port}}
    )
    failed = await fire_and_end(sim_state, FAIL)
    await fire_and_end(sim_state, OK)  # succeeded: not among the events asked for
    await wait_until(lambda: len(ops.got) == 3, what="three tries")
    ids = {headers["X-Mqtt-Starter-Delivery"] for headers, _ in ops.got}
    assert len(ids) == 1
    assert [b for _, b in ops.got] == [ops.got[0][1]] * 3
    headers, body = ops.got[0]
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert (headers["X-Mqtt-Starter-Signature"], headers["X-Mqtt-Starter-Event"]) == (
        expected,
        "failed",
    )
    assert (headers["Content-Type"], headers["X-Team"]) == ("application/json", "bi")
    event = json.loads(body)
    assert (event["event"], event["taskId"], event["executionId"], event["state"]) == (
        "failed",
        FAIL,
        failed,
        "FinishedFail",
    )
    assert ERROR in event["reason"]
    # A second failure is the next POST: the first was delivered once and not tried again.
    second = await fire_and_end(sim_state, FAIL)
    await wait_until(lambda: len(ops.got) == 4, what="the second failure's delivery")
    assert ops.bodies()[3]["executionId"] == second
    assert ops.got[3][0]["X-Mqtt-Starter-Delivery"] not in ids

    async def counted() -> bool:
        samples = await metric_samples(port, "webhook")
        return samples.get(("mqtt_starter_webhook_deliveries_total", "ops", "delivered")) == 2.0

    await wait_until(counted, what="the delivery counters")
    samples = await metric_samples(port, "webhook")
    assert samples[("mqtt_starter_webhook_deliveries_total", "ops", "retried")] == 2.0
    assert ("mqtt_starter_webhook_deliveries_total", "ops", "failed") not in samples


async def test_a_receiver_that_hangs_delays_no_status_event_and_no_other_webhook(
    make_daemon: Any, mqtt: Client, sim_state: SimState, receivers: dict[str, Receiver]
) -> None:
    ops, chat = receivers["ops"], receivers["chat"]
    ops.answers = ["hang"]
    alerts = {"webhooks": [hook("ops", ops, timeout_s=3600), hook("chat", chat, format="text")]}
    await watch(mqtt)
    await monitoring(make_daemon, mqtt, sections={"alerts": alerts})
    first = await fire_and_end(sim_state, FAIL)
    await wait_until(lambda: len(ops.got) == 1, what="the receiver to hold the first POST")
    # While it hangs, the other runs' events are published and the other webhook is served.
    second = await fire_and_end(sim_state, FAIL)
    await mqtt.wait_for(f"{helpers.BASE}/event/task/failed", 2)
    assert [r.json()["executionId"] for r in mqtt.on(f"{helpers.BASE}/event/task/failed")] == [
        first,
        second,
    ]
    await wait_until(lambda: len(chat.got) == 2, what="the other webhook's deliveries")
    assert len(ops.got) == 1
    [event] = [
        r.json()
        for r in mqtt.on(f"{helpers.BASE}/event/task/failed")
        if r.json()["executionId"] == first
    ]
    reason = [line for line in event["reason"].splitlines() if line.strip()][-8:]
    assert chat.bodies()[0] == {
        "text": "\n".join(
            [
                f"Qlik Sense task Nightly Forecast failed (FinishedFail) after"
                f" {event['durationMs'] / 1000:.1f} s",
                *reason,
            ]
        )
    }
    assert any(ERROR in line for line in reason)
    ops.release.set()
    await wait_until(lambda: len(ops.got) == 2, what="the held delivery, then the next")


async def test_a_4xx_is_given_up_at_once_and_scope_and_events_choose(
    make_daemon: Any, mqtt: Client, sim_state: SimState, receivers: dict[str, Receiver]
) -> None:
    ops, chat = receivers["ops"], receivers["chat"]
    ops.answers = [400]
    alerts = {
        "webhooks": [
            hook("ops", ops),
            hook("chat", chat, events=["succeeded"], scope={"tags": ["Adhoc"]}),
        ]
    }
    await monitoring(make_daemon, mqtt, sections={"alerts": alerts})
    await fire_and_end(sim_state, FAIL)
    await wait_until(lambda: len(ops.got) == 1, what="the refused delivery")
    await fire_and_end(sim_state, OK)  # succeeded, but outside the chat webhook's scope
    adhoc = await fire_and_end(sim_state, OUTSIDE)
    await wait_until(lambda: len(chat.got) == 1, what="the success in scope")
    assert (chat.bodies()[0]["event"], chat.bodies()[0]["executionId"]) == ("succeeded", adhoc)
    second = await fire_and_end(sim_state, FAIL)
    await wait_until(lambda: len(ops.got) == 2, what="the next failure")
    assert ops.bodies()[1]["executionId"] == second  # the refused one was not tried again
