"""Section 3 behaviour: wait, status events, policy results, dedupe, retained, bad input."""

from __future__ import annotations

from typing import Any

import pytest

from mqtt_starter.simulators.qrs.filter_engine import evaluate as evaluate_filter
from mqtt_starter.simulators.qrs.filter_engine import parse as parse_filter
from mqtt_starter.simulators.qrs.state import SimState
from tests.integration import helpers
from tests.integration.conftest import Client, LocalDaemon
from tests.integration.helpers import (
    ARCHIVE,
    BUDGET,
    EXPORT,
    FORECAST,
    LONG,
    SALES,
    STOCK,
    executions,
    line,
    refusal,
    reply,
    task_calls,
)

STATE_ORDER = ["Triggered", "Queued", "Started", "FinishedSuccess"]


@pytest.fixture
def make_daemon(make_local_daemon: Any) -> Any:
    """The daemon in-process: nothing here depends on it being a process."""
    return make_local_daemon


def finished_line(
    state: SimState, task_id: str, matched: list[str], status: str, code: int, **extra: Any
) -> dict[str, Any]:
    [execution_id] = executions(state, task_id)
    results = [r for r in state.results if r["executionID"] == execution_id]
    data = line(
        state,
        task_id,
        matched,
        "started",
        state=status,
        stateCode=code,
        durationMs=results[-1]["duration"],
    )
    data.update(extra)
    return data


async def test_wait_success_and_the_status_events(
    daemon: LocalDaemon, mqtt: Client, sim_state: SimState
) -> None:
    await mqtt.subscribe(f"{helpers.BASE}/status/#")
    topic = "test/wait-ok"
    await mqtt.subscribe(topic)
    await mqtt.publish(
        f"{helpers.BASE}/start/id/{SALES}", {"requestId": "w1", "wait": True}, response_topic=topic
    )
    accepted, finished = await mqtt.wait_for(topic, 2)
    assert accepted.json() == reply(
        "ok", [line(sim_state, SALES, ["id"], "started")], request_id="w1"
    )
    assert finished.json() == reply(
        "ok",
        [finished_line(sim_state, SALES, ["id"], "FinishedSuccess", 7)],
        request_id="w1",
        stage="finished",
    )
    events = [e.json() for e in mqtt.on(f"{helpers.BASE}/status/task/{SALES}")]
    states = [e["state"] for e in events]
    # Each observed state once, in the order of the state machine, ending in success.
    assert states == sorted(set(states), key=STATE_ORDER.index)
    assert states[-1] == "FinishedSuccess"
    [result] = [r for r in sim_state.results if r["taskID"] == SALES]
    assert events[-1] == {
        "taskId": SALES,
        "taskName": "Reload Sales",
        "executionId": result["executionID"],
        "state": "FinishedSuccess",
        "stateCode": 7,
        "requestId": "w1",
        "startedBy": "mqtt-starter",
        "startTime": result["startTime"],
        "stopTime": result["stopTime"],
        "durationMs": result["duration"],
        "message": "Changing task state from Started to FinishedSuccess",
    }


async def test_wait_with_failure_and_retry(
    daemon: LocalDaemon, mqtt: Client, sim_state: SimState
) -> None:
    await mqtt.subscribe(f"{helpers.BASE}/status/#")
    answer_topic = "test/wait-fail"
    await mqtt.subscribe(answer_topic)
    await mqtt.publish(
        f"{helpers.BASE}/start",
        {"requestId": "w2", "wait": True, "taskIds": [FORECAST, BUDGET]},
        response_topic=answer_topic,
    )
    accepted, finished = await mqtt.wait_for(answer_topic, 2)
    assert accepted.json()["status"] == "ok"
    assert finished.json() == reply(
        "partial",
        [
            finished_line(
                sim_state, FORECAST, ["id"], "FinishedFail", 8, reason="Field 'Amount' not found"
            ),
            finished_line(sim_state, BUDGET, ["id"], "FinishedSuccess", 7),
        ],
        request_id="w2",
        stage="finished",
    )
    # The retry shows up as a second attempt under the same execution.
    budget = [e.json() for e in mqtt.on(f"{helpers.BASE}/status/task/{BUDGET}")]
    assert len({e["executionId"] for e in budget}) == 1
    assert budget[-1]["state"] == "FinishedSuccess"
    assert sorted(sim_state.started) == sorted([FORECAST, BUDGET])


async def test_already_running(daemon: LocalDaemon, mqtt: Client, sim_state: SimState) -> None:
    first = await mqtt.request(f"{helpers.BASE}/start/id/{LONG}")
    assert first["tasks"][0]["result"] == "started"
    second = await mqtt.request(f"{helpers.BASE}/start/id/{LONG}")
    assert second == reply("error", [line(None, LONG, ["id"], "already_running")])
    assert sim_state.started == [LONG]
    # The task's live lastExecutionResult showed the run: no second start was sent.
    assert [c[0] for c in task_calls(sim_state)] == ["GET", "POST", "GET"]


async def test_a_run_that_ends_in_failure_alone_is_an_error(
    daemon: LocalDaemon, mqtt: Client, sim_state: SimState
) -> None:
    topic = "test/wait-error"
    await mqtt.subscribe(topic)
    await mqtt.publish(f"{helpers.BASE}/start/id/{FORECAST}", {"wait": True}, response_topic=topic)
    _, finished = await mqtt.wait_for(topic, 2)
    assert finished.json() == reply(
        "error",
        [
            finished_line(
                sim_state, FORECAST, ["id"], "FinishedFail", 8, reason="Field 'Amount' not found"
            )
        ],
        stage="finished",
    )


async def test_wait_as_a_user_without_read_rights_ends_unknown(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    # The fixture denies INTERNAL\reader the execution results ([]) and sessions (403).
    await make_daemon(qrs={"user_id": "reader"})
    topic = "test/wait-reader"
    await mqtt.subscribe(topic)
    await mqtt.publish(
        f"{helpers.BASE}/start/id/{SALES}",
        {"requestId": "r1", "wait": True, "waitTimeoutS": 600},
        response_topic=topic,
    )
    accepted, finished = await mqtt.wait_for(topic, 2)
    assert accepted.json() == reply(
        "ok", [line(sim_state, SALES, ["id"], "started")], request_id="r1"
    )
    assert finished.json() == reply(
        "error",
        [
            line(
                sim_state,
                SALES,
                ["id"],
                "started",
                state="Unknown",
                stateCode=None,
                durationMs=None,
                error="QRS shows no result and refuses the session: QRS refused GET"
                f" /qrs/executionsession/{executions(sim_state, SALES)[0]}: HTTP 403 Forbidden",
            )
        ],
        request_id="r1",
        stage="finished",
    )


async def test_wait_ends_at_the_request_timeout(
    daemon: LocalDaemon, mqtt: Client, sim_state: SimState
) -> None:
    topic = "test/wait-timeout"
    await mqtt.subscribe(topic, f"{helpers.BASE}/status/#")
    await mqtt.publish(
        f"{helpers.BASE}/start/id/{LONG}", {"wait": True, "waitTimeoutS": 0.5}, response_topic=topic
    )
    _, finished = await mqtt.wait_for(topic, 2)
    [task] = finished.json()["tasks"]
    last_event = mqtt.on(f"{helpers.BASE}/status/task/{LONG}")[-1].json()
    assert finished.json()["status"] == "error"
    assert task == line(
        sim_state,
        LONG,
        ["id"],
        "started",
        state=last_event["state"],
        stateCode=last_event["stateCode"],
        durationMs=0,
        timedOut=True,
    )
    assert task["state"] in ("Triggered", "Started")


async def test_a_lost_answer_to_a_start_is_not_sent_again(
    daemon: LocalDaemon, mqtt: Client, sim_state: SimState
) -> None:
    sim_state.faults.lose_next, sim_state.faults.lose_as = 1, "drop"
    sim_state.faults.path_contains = "/start"
    answer = await mqtt.request(f"{helpers.BASE}/start/id/{SALES}", {"requestId": "lost"})
    assert answer == reply("ok", [line(sim_state, SALES, ["id"], "started")], request_id="lost")
    assert sim_state.started == [SALES]
    assert [c[0] for c in task_calls(sim_state)] == ["GET", "POST", "GET"]
    assert f"the answer to starting task {SALES} was lost" in daemon.log


async def test_disabled_makes_no_start_call(
    daemon: LocalDaemon, mqtt: Client, sim_state: SimState
) -> None:
    answer = await mqtt.request(f"{helpers.BASE}/start/id/{ARCHIVE}")
    assert answer == reply("error", [line(None, ARCHIVE, ["id"], "disabled")])
    assert [c[0] for c in task_calls(sim_state)] == ["GET"]


async def test_allow_list_denies_per_task(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    await make_daemon(policy={"allow": {"tags": ["nightly"]}})
    answer = await mqtt.request(f"{helpers.BASE}/start/tag/startTask1")
    assert answer == reply(
        "partial",
        [
            line(sim_state, SALES, ["tag:startTask1"], "started"),
            line(None, EXPORT, ["tag:startTask1"], "denied", error="not in policy.allow"),
        ],
    )
    assert sim_state.started == [SALES]


async def test_dry_run_starts_nothing(
    daemon: LocalDaemon, mqtt: Client, sim_state: SimState
) -> None:
    answer = await mqtt.request(f"{helpers.BASE}/start/tag/Nightly", {"dryRun": True})
    assert answer == reply(
        "partial",
        [
            line(None, SALES, ["tag:Nightly"], "dry_run"),
            line(None, STOCK, ["tag:Nightly"], "dry_run"),
            line(None, ARCHIVE, ["tag:Nightly"], "disabled"),
        ],
    )
    assert [c[0] for c in task_calls(sim_state)] == ["GET"]


async def test_all_task_ids_must_exist(
    daemon: LocalDaemon, mqtt: Client, sim_state: SimState
) -> None:
    answer = await mqtt.request(
        f"{helpers.BASE}/start",
        {"taskIds": [SALES, "not-a-guid"], "names": ["Reload Stock"], "allTaskIdsMustExist": True},
    )
    assert answer == reply(
        "partial",
        [
            line(sim_state, STOCK, ["name"], "started"),
            line(
                None,
                SALES,
                ["id"],
                "denied",
                error="allTaskIdsMustExist: an id in the request is unknown or invalid",
            ),
        ],
        unmatched=[{"selector": "id:not-a-guid", "reason": "invalid_id"}],
    )
    assert sim_state.started == [STOCK]


async def test_repeated_request_id_is_answered_from_memory(
    daemon: LocalDaemon, mqtt: Client, sim_state: SimState
) -> None:
    first = await mqtt.request(f"{helpers.BASE}/start/id/{SALES}", {"requestId": "once"})
    again = await mqtt.request(f"{helpers.BASE}/start/id/{SALES}", {"requestId": "once"})
    assert first == reply("ok", [line(sim_state, SALES, ["id"], "started")], request_id="once")
    assert again == {**first, "replayed": True}
    assert sim_state.started == [SALES]
    assert [c[0] for c in task_calls(sim_state)] == ["GET", "POST"]


async def test_retained_trigger_is_ignored(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    # (An empty retained payload would delete the retained message instead.)
    await mqtt.publish(f"{helpers.BASE}/start/id/{SALES}", {"requestId": "stale"}, retain=True)
    daemon = await make_daemon()
    answer = await mqtt.request(f"{helpers.BASE}/start/id/{STOCK}")
    assert answer["tasks"][0]["taskId"] == STOCK
    assert sim_state.started == [STOCK]
    assert f"ignored {helpers.BASE}/start/id/{SALES}: retained message" in daemon.log
    await mqtt.publish(f"{helpers.BASE}/start/id/{SALES}", retain=True, payload=b"")


@pytest.mark.parametrize("accept_retained", [False, True])
async def test_a_retained_trigger_published_live_and_its_clearing_start_nothing(
    make_daemon: Any, mqtt: Client, sim_state: SimState, accept_retained: bool
) -> None:
    """MQTT 5, Retain As Published: a retained start published while the daemon is
    subscribed still says it is retained; clearing it (an empty retained message) never
    starts anything, even with mqtt.accept_retained."""
    daemon = await make_daemon(mqtt={"accept_retained": accept_retained})
    await mqtt.publish(f"{helpers.BASE}/start/id/{SALES}", retain=True, payload=b"")  # a clearing
    if not accept_retained:
        await mqtt.publish(f"{helpers.BASE}/start/id/{SALES}", {"requestId": "live"}, retain=True)
    # A live request after them: once it is answered, the ones before were handled.
    answer = await mqtt.request(f"{helpers.BASE}/start/id/{STOCK}")
    assert [t["taskId"] for t in answer["tasks"]] == [STOCK]
    assert sim_state.started == [STOCK]
    ignored = [line for line in daemon.log.splitlines() if line.startswith("ignored ")]
    expected = [
        f"ignored {helpers.BASE}/start/id/{SALES}: an empty retained message (a retained trigger"
        " being cleared)"
    ]
    if not accept_retained:
        expected.append(
            f"ignored {helpers.BASE}/start/id/{SALES}: retained message on a trigger topic"
            " (mqtt.accept_retained is false)"
        )
    assert ignored == expected
    await mqtt.publish(f"{helpers.BASE}/start/id/{SALES}", retain=True, payload=b"")


BAD_INPUT = [
    (
        "butler/start/id/" + SALES,
        b"{not json",
        "bad_payload",
        "invalid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
    ),
    (
        "butler/start",
        {"tags": "Nightly"},
        "bad_payload",
        "tags: expected a list of strings",
    ),
    (
        "butler/start",
        {"customProperties": [{"name": "taskGroup"}]},
        "bad_payload",
        "customProperties[0].value: field required",
    ),
    (
        "butler/start",
        {"tags": ["a"], "wait": "yes"},
        "bad_payload",
        "wait: expected true or false",
    ),
    (
        "butler/start",
        {"tags": ["a"], "colour": "red"},
        "bad_payload",
        "colour: unknown field",
    ),
    (
        "butler/start",
        {},
        "bad_payload",
        "no selectors: give taskIds, tags, customProperties or names",
    ),
    (
        "butler/start",
        [{"type": "startall", "payload": {}}],
        "bad_payload",
        "[0].type: unknown type 'startall'; expected one of starttaskid, starttasktag,"
        " starttaskcustomproperty, keyvaluestore",
    ),
    (
        "butler/start",
        b"[" * 40 + b"]" * 40,
        "bad_payload",
        "JSON is nested deeper than 32 levels",
    ),
    (
        "butler/start",
        b'"just a string"',
        "bad_payload",
        "payload must be a JSON object or Butler's array of {type, payload} items",
    ),
    (
        "butler/start/tag/Nightly",
        b"x" * 70000,
        "payload_too_large",
        "payload is 70000 bytes; the limit is 65536",
    ),
    (
        "butler/start/tag/bad%zzescape",
        b"",
        "bad_topic",
        "malformed percent-encoding in topic level 'bad%zzescape'",
    ),
    (
        "butler/start/tag/%FF",
        b"",
        "bad_topic",
        "topic level '%FF' does not decode to UTF-8",
    ),
    (
        "butler/start/everything/now",
        b"",
        "bad_topic",
        "unknown trigger kind 'everything': use butler/start/<id|tag|cp|name>/...",
    ),
    (
        "butler/start/cp/onlyname",
        b"",
        "bad_topic",
        "butler/start/cp takes <name>/<value>: percent-encode a / inside a value as %2F",
    ),
    (
        "butler/start",
        {"taskIds": [f"{i:08d}-0000-4000-8000-000000000000" for i in range(101)]},
        "too_many_tasks",
        "101 selectors; the limit is 100",
    ),
]


async def test_bad_input_gets_an_error_and_the_daemon_goes_on(
    daemon: LocalDaemon, mqtt: Client, sim_state: SimState
) -> None:
    for topic, payload, code, message in BAD_INPUT:
        answer = await mqtt.request(helpers.on_base(topic), payload)
        assert answer == refusal(code, helpers.on_base(message)), (topic, payload)
    bad_guid = await mqtt.request(
        f"{helpers.BASE}/start", {"requestId": "g", "taskIds": ["6ca1-nope"]}
    )
    assert bad_guid == reply(
        "error", [], [{"selector": "id:6ca1-nope", "reason": "invalid_id"}], request_id="g"
    )
    assert sim_state.started == []
    assert await mqtt.request(f"{helpers.BASE}/start/id/{SALES}") == reply(
        "ok", [line(sim_state, SALES, ["id"], "started")]
    )
    assert daemon.alive


async def test_request_id_is_echoed_in_refusals(daemon: LocalDaemon, mqtt: Client) -> None:
    answer = await mqtt.request(f"{helpers.BASE}/start", {"requestId": "keep-me", "tags": 5})
    assert answer == refusal("bad_payload", "tags: expected a list of strings", "keep-me")


async def test_qrs_unavailable(make_daemon: Any, mqtt: Client, sim_state: SimState) -> None:
    await make_daemon()
    sim_state.faults.fail_next = 3  # the retry budget of the test configuration
    answer = await mqtt.request(f"{helpers.BASE}/start/id/{SALES}", {"requestId": "down"})
    assert answer["status"] == "error"
    assert answer["error"]["code"] == "qrs_unavailable"
    assert answer["error"]["message"].startswith("QRS GET /qrs/task/full failed after 3 attempt(s)")
    # Not remembered: the same requestId is served once QRS is back.
    again = await mqtt.request(f"{helpers.BASE}/start/id/{SALES}", {"requestId": "down"})
    assert again == reply("ok", [line(sim_state, SALES, ["id"], "started")], request_id="down")


INJECTIONS = [
    "x' or name ne '",
    "x\\' or name ne \\'",
    "') or (id ne '",
    "Nightly' or tags.name ne 'x",
    "' or 1 eq 1 or '",
    "*",
    "%",
    "a&filter=name ne 'x'",
    "Nightly#",
    "Night+ly",
    "Nightly/..",
    "Ünïcødé' or ''='",
    "name eq 'x' or name so ''",
    "x" * 3000,
]


async def test_injection_attempts_never_start_a_task_outside_the_selector(
    daemon: LocalDaemon, mqtt: Client, sim_state: SimState
) -> None:
    for value in INJECTIONS:
        encoded = "".join(
            f"%{b:02X}" if chr(b) in "%/+#" or b > 127 else chr(b) for b in value.encode()
        )
        for topic, payload in [
            (f"{helpers.BASE}/start/tag/{encoded}", {}),
            (f"{helpers.BASE}/start/name/{encoded}", {}),
            (f"{helpers.BASE}/start/cp/taskGroup/{encoded}", {}),
            (f"{helpers.BASE}/start/cp/{encoded}/tasks1", {}),
            (
                f"{helpers.BASE}/start",
                {
                    "tags": [value],
                    "names": [value],
                    "customProperties": [{"name": value, "value": value}],
                },
            ),
        ]:
            answer = await mqtt.request(topic, payload)
            assert answer["status"] == "error", (topic, answer)
            assert answer.get("tasks", []) == []
            if len(value) > 300:
                assert answer["error"]["code"] == "bad_payload"
    assert sim_state.started == []
    lookups = [e for e in sim_state.journal if e.path == "/qrs/task/full"]
    assert [e.status for e in lookups] == [200] * (5 * (len(INJECTIONS) - 1))  # not the long one
    # The escaping itself, which the re-check of every answer would hide: in QRS's filter
    # language, no filter the daemon sent selects any task.
    tasks = sim_state.task_objects("task", full=True)
    for entry in lookups:
        node = parse_filter(entry.query["filter"])
        assert [t["name"] for t in tasks if evaluate_filter(node, t)] == [], entry.query["filter"]
