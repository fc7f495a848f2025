"""Trigger topics, payloads, replies and errors, against a real mosquitto and the daemon process."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from mqtt_starter.simulators.qrs.state import SimState
from tests.integration import helpers
from tests.integration.conftest import Broker, Client, LocalDaemon
from tests.integration.helpers import (
    ARCHIVE,
    DECOY,
    EXPORT,
    FORECAST,
    QUARTER,
    SALES,
    STOCK,
    line,
    refusal,
    reply,
    task_calls,
)


@pytest.fixture
def make_daemon(make_local_daemon: Any) -> Any:
    """The daemon in-process: nothing here depends on it being a process."""
    return make_local_daemon


def by_id(task_id: str) -> tuple[str, str, str]:
    return ("GET", "/qrs/task/full", f"id eq {task_id}")


def start(task_id: str) -> tuple[str, str, str]:
    return ("POST", f"/qrs/task/{task_id}/start/synchronous", "")


async def test_start_by_id(daemon: LocalDaemon, mqtt: Client, sim_state: SimState) -> None:
    answer = await mqtt.request(f"{helpers.BASE}/start/id/{SALES.upper()}")
    assert answer == reply("ok", [line(sim_state, SALES, ["id"], "started")])
    assert task_calls(sim_state) == [by_id(SALES), start(SALES)]


async def test_start_by_tag_reports_disabled_tasks(
    daemon: LocalDaemon, mqtt: Client, sim_state: SimState
) -> None:
    answer = await mqtt.request(f"{helpers.BASE}/start/tag/Nightly")
    assert answer == reply(
        "partial",
        [
            line(sim_state, SALES, ["tag:Nightly"], "started"),
            line(sim_state, STOCK, ["tag:Nightly"], "started"),
            line(None, ARCHIVE, ["tag:Nightly"], "disabled"),
        ],
    )
    assert sorted(task_calls(sim_state)[1:]) == sorted([start(SALES), start(STOCK)])


async def test_start_by_custom_property_skips_the_decoy(
    daemon: LocalDaemon, mqtt: Client, sim_state: SimState
) -> None:
    answer = await mqtt.request(f"{helpers.BASE}/start/cp/taskGroup/tasks2")
    assert answer == reply("ok", [line(sim_state, STOCK, ["cp:taskGroup=tasks2"], "started")])
    assert sim_state.started == [STOCK]


@pytest.mark.parametrize(
    ("topic", "task_id", "label"),
    [
        ("butler/start/name/Reload Sales", SALES, "name"),
        ("butler/start/name/Quarter%20report", QUARTER, "name"),
        ("butler/start/tag/Q1'25", QUARTER, "tag:Q1'25"),
        ("butler/start/tag/a%26b%23c%2Bd%2Fe%25f", QUARTER, "tag:a&b#c+d/e%f"),
        (f"{helpers.BASE}/start/tag/%C3%9Cn%C3%AFc%C3%B8d%C3%A9 ☃", QUARTER, "tag:Ünïcødé ☃"),
    ],
)
async def test_names_and_percent_encoded_levels(
    daemon: LocalDaemon, mqtt: Client, sim_state: SimState, topic: str, task_id: str, label: str
) -> None:
    answer = await mqtt.request(helpers.on_base(topic))
    assert answer == reply("ok", [line(sim_state, task_id, [label], "started")])


async def test_json_body_unites_selectors(
    daemon: LocalDaemon, mqtt: Client, sim_state: SimState
) -> None:
    answer = await mqtt.request(
        f"{helpers.BASE}/start",
        {
            "requestId": "r-json",
            "taskIds": [f" {SALES} "],
            "tags": ["startTask1"],
            "customProperties": [{"name": "taskGroup", "value": "tasks1"}],
            "names": ["Reload Sales"],
        },
    )
    assert answer == reply(
        "ok",
        [
            line(
                sim_state, SALES, ["id", "tag:startTask1", "cp:taskGroup=tasks1", "name"], "started"
            ),
            line(sim_state, EXPORT, ["tag:startTask1"], "started"),
            line(sim_state, DECOY, ["cp:taskGroup=tasks1"], "started"),
        ],
        request_id="r-json",
    )
    assert sorted(sim_state.started) == sorted([SALES, EXPORT, DECOY])
    [lookup] = [c for c in task_calls(sim_state) if c[0] == "GET"]
    assert lookup[2] == (
        f"id eq {SALES} or tags.name eq 'startTask1' or (customProperties.definition.name eq"
        " 'taskGroup' and customProperties.value eq 'tasks1') or name eq 'Reload Sales'"
    )


async def test_topic_and_payload_selectors_are_united(
    daemon: LocalDaemon, mqtt: Client, sim_state: SimState
) -> None:
    answer = await mqtt.request(f"{helpers.BASE}/start/id/{SALES}", {"names": ["Reload Stock"]})
    assert answer == reply(
        "ok",
        [line(sim_state, SALES, ["id"], "started"), line(sim_state, STOCK, ["name"], "started")],
    )


async def test_butler_array_body(daemon: LocalDaemon, mqtt: Client, sim_state: SimState) -> None:
    answer = await mqtt.request(
        f"{helpers.BASE}/start",
        [
            {"type": "starttaskid", "payload": {"taskId": EXPORT}},
            {"type": "starttasktag", "payload": {"tag": "startTask1"}},
            {
                "type": "starttaskcustomproperty",
                "payload": {"customPropertyName": "taskGroup", "customPropertyValue": "tasks2"},
            },
            {"type": "keyvaluestore", "payload": {"namespace": "ns", "key": "k", "value": "v"}},
        ],
    )
    assert answer == {
        **reply(
            "ok",
            [
                line(sim_state, EXPORT, ["id", "tag:startTask1"], "started"),
                line(sim_state, SALES, ["tag:startTask1"], "started"),
                line(sim_state, STOCK, ["cp:taskGroup=tasks2"], "started"),
            ],
        ),
        "ignored": ["keyvaluestore"],  # Butler's key-value store is not served: said so
    }


async def test_routes_with_wildcards_when_and_debounce(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    await make_daemon(
        routes=[
            {
                "topic": "factory/+/data-ready",
                "names": ["Reload {1}"],
                "when": {"field": "status", "equals": "complete"},
            },
            {"topic": "plant/+/+/done", "tags": ["{2}"], "debounce_s": 600},
        ]
    )
    await mqtt.subscribe(f"{helpers.BASE}/reply/#")
    await mqtt.publish("factory/Sales/data-ready", {"status": "running"})
    await mqtt.publish("factory/Sales/data-ready", "not json")
    await mqtt.publish("factory/Sales/data-ready", {"status": "complete", "line": 4})
    [answer] = await mqtt.wait_for(f"{helpers.BASE}/reply/factory/Sales/data-ready")
    assert answer.json() == reply("ok", [line(sim_state, SALES, ["name"], "started")])
    assert sim_state.started == [SALES]

    for _ in range(3):
        await mqtt.publish("plant/a/Fragile/done")
    answers = await mqtt.wait_for(f"{helpers.BASE}/reply/plant/a/Fragile/done", 3)
    # The debounced ones answer without a QRS call, so they may arrive before the first.
    debounced = {
        "requestId": None,
        "status": "ok",
        "stage": "accepted",
        "tasks": [],
        "unmatched": [],
        "notes": ["debounced: started less than 600.0s ago"],
        "instance": helpers.INSTANCE,
    }
    assert sorted((a.json() == debounced, a.json()["status"]) for a in answers) == [
        (False, "ok"),
        (True, "ok"),
        (True, "ok"),
    ]
    assert sim_state.started == [SALES, FORECAST]


async def test_mosquitto_rr_round_trip_with_correlation_data(
    daemon: LocalDaemon, broker: Broker, sim_state: SimState
) -> None:
    process = await asyncio.create_subprocess_exec(
        "mosquitto_rr",
        "-h",
        "127.0.0.1",
        "-p",
        str(broker.port),
        "-V",
        "5",
        "-t",
        f"{helpers.BASE}/start/id/{SALES}",
        "-e",
        "rr/answer",
        "-D",
        "PUBLISH",
        "correlation-data",
        "corr-42",
        "-m",
        json.dumps({"requestId": "rr-1"}),
        "-W",
        "10",
        "-F",
        "%D|%p",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err
    correlation, payload = out.decode().strip().split("|", 1)
    assert correlation == "corr-42"
    assert json.loads(payload) == reply(
        "ok", [line(sim_state, SALES, ["id"], "started")], request_id="rr-1"
    )


async def test_mqtt_311_client_with_reply_to(
    daemon: LocalDaemon, broker: Broker, sim_state: SimState
) -> None:
    async with Client(broker, v5=False) as old:
        await old.subscribe("erp/replies")
        await old.publish(
            f"{helpers.BASE}/start/id/{STOCK}", {"requestId": "erp-1", "replyTo": "erp/replies"}
        )
        [answer] = await old.wait_for("erp/replies")
    assert answer.json() == reply(
        "ok", [line(sim_state, STOCK, ["id"], "started")], request_id="erp-1"
    )


async def test_default_reply_topic(daemon: LocalDaemon, mqtt: Client, sim_state: SimState) -> None:
    await mqtt.subscribe(f"{helpers.BASE}/reply/#")
    await mqtt.publish(f"{helpers.BASE}/start/tag/startTask1")
    [answer] = await mqtt.wait_for(f"{helpers.BASE}/reply/start/tag/startTask1")
    assert answer.json() == reply(
        "ok",
        [
            line(sim_state, SALES, ["tag:startTask1"], "started"),
            line(sim_state, EXPORT, ["tag:startTask1"], "started"),
        ],
    )


@pytest.mark.parametrize(
    ("how", "topic", "message"),
    [
        (
            "response",
            "butler/start/tag/Nightly",
            "reply topic 'butler/start/tag/Nightly' is a trigger topic of this daemon",
        ),
        (
            "replyTo",
            "butler/start",
            "reply topic 'butler/start' is a trigger topic of this daemon",
        ),
        ("replyTo", "$SYS/broker/x", "reply topic '$SYS/broker/x' starts with $"),
        ("response", "replies/+/x", "reply topic 'replies/+/x' contains a wildcard or NUL"),
        ("replyTo", "replies/#", "reply topic 'replies/#' contains a wildcard or NUL"),
        ("replyTo", "elsewhere/x", "reply topic 'elsewhere/x' is outside mqtt.reply_topic_allow"),
    ],
)
async def test_refused_reply_topics(
    make_daemon: Any, mqtt: Client, sim_state: SimState, how: str, topic: str, message: str
) -> None:
    topic, message = helpers.on_base(topic), helpers.on_base(message)
    await make_daemon(mqtt={"reply_topic_allow": ["replies/#", f"{helpers.BASE}/#"]})
    await mqtt.subscribe(f"{helpers.BASE}/reply/#")
    if how == "response":
        await mqtt.publish(
            f"{helpers.BASE}/start/id/{SALES}", {"requestId": "bad-reply"}, response_topic=topic
        )
    else:
        await mqtt.publish(
            f"{helpers.BASE}/start/id/{SALES}", {"requestId": "bad-reply", "replyTo": topic}
        )
    [answer] = await mqtt.wait_for(f"{helpers.BASE}/reply/start/id/{SALES}")
    assert answer.json() == refusal("reply_topic_refused", message, "bad-reply")
    assert sim_state.started == []


async def test_a_route_fed_by_status_events_starts_its_tasks(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    """A chain built by hand: the status events of SALES's run carry the upstream request's
    requestId, and the route's request (another topic, other selectors) is served, not
    answered from memory as a repeat."""
    await make_daemon(
        routes=[
            {
                "topic": f"{helpers.BASE}/status/task/{SALES}",
                "task_ids": [STOCK],
                "when": {"field": "state", "equals": "FinishedSuccess"},
            }
        ]
    )
    await mqtt.subscribe(f"{helpers.BASE}/reply/status/task/{SALES}")
    upstream = await mqtt.request(f"{helpers.BASE}/start/id/{SALES}", {"requestId": "erp-1"})
    assert upstream["tasks"][0]["result"] == "started"
    [chained] = await mqtt.wait_for(f"{helpers.BASE}/reply/status/task/{SALES}")
    assert chained.json()["requestId"] == "erp-1"
    assert not chained.json().get("replayed")
    assert [t["result"] for t in chained.json()["tasks"]] == ["started"]
    assert sim_state.started == [SALES, STOCK]


async def test_butlers_own_mqtt_start_a_bare_task_id(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    """`qliksense/start_task` with the task id as the whole payload, as Butler's MQTT start."""
    await make_daemon(routes=[{"topic": "qliksense/start_task", "payload_as": "task_id"}])
    await mqtt.subscribe(f"{helpers.BASE}/reply/#")
    await mqtt.publish("qliksense/start_task", f"  {SALES}\n")
    await mqtt.publish("qliksense/start_task", b"")
    answers = await mqtt.wait_for(f"{helpers.BASE}/reply/qliksense/start_task", 2)
    by_status = {a.json()["status"]: a.json() for a in answers}
    assert by_status["ok"] == reply("ok", [line(sim_state, SALES, ["id"], "started")])
    assert by_status["error"]["error"] == {
        "code": "bad_payload",
        "message": "route qliksense/start_task: the payload is the id: it is empty or not"
        " UTF-8 text",
    }
    assert sim_state.started == [SALES]
