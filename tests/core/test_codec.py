"""Payload decoding and request parsing, reply encoding."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mqtt_starter.core.codec import decode_json, encode_reply, parse_request, reply_status
from mqtt_starter.core.errors import BadPayload, PayloadTooLarge
from mqtt_starter.core.model import (
    Execution,
    FollowEnd,
    Reply,
    ReplyStatus,
    Request,
    Selector,
    SelectorKind,
    TaskOutcome,
    TaskRef,
    TaskResult,
    TaskStatus,
    Unmatched,
    UnmatchedReason,
)

TAG = SelectorKind.TAG


def test_empty_payload_is_an_empty_request() -> None:
    assert parse_request(decode_json(b"  \n", 100), (Selector(TAG, "x"),)) == Request(
        selectors=(Selector(TAG, "x"),)
    )


def test_full_request() -> None:
    data = {
        "requestId": "r",
        "replyTo": "a/b",
        "taskIds": ["t"],
        "tags": ["n"],
        "customProperties": [{"name": "g", "value": "v"}],
        "names": ["m"],
        "allTaskIdsMustExist": True,
        "wait": True,
        "dryRun": True,
    }
    assert parse_request(data) == Request(
        selectors=(
            Selector(SelectorKind.ID, "t"),
            Selector(TAG, "n"),
            Selector(SelectorKind.CUSTOM_PROPERTY, "v", "g"),
            Selector(SelectorKind.NAME, "m"),
        ),
        request_id="r",
        reply_to="a/b",
        all_task_ids_must_exist=True,
        wait=True,
        dry_run=True,
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tags": "x"}, "tags: expected a list of strings"),
        ({"tags": ["a", 3]}, "tags[1]: expected a string"),
        ({"taskIds": None}, "taskIds: expected a list of strings"),
        ({"customProperties": {}}, "customProperties: expected a list of {name, value} objects"),
        ({"customProperties": ["x"]}, "customProperties[0]: expected an object"),
        ({"customProperties": [{"value": "v"}]}, "customProperties[0].name: field required"),
        (
            {"customProperties": [{"name": "n", "value": 1}]},
            "customProperties[0].value: expected a string",
        ),
        (
            {"customProperties": [{"name": "n", "value": "v", "x": 1}]},
            "customProperties[0].x: unknown field",
        ),
        ({"wait": 1}, "wait: expected true or false"),
        ({"dryRun": "true"}, "dryRun: expected true or false"),
        ({"requestId": 7}, "requestId: expected a string"),
        ({"requestId": ""}, "requestId: 1 to 256 characters"),
        ({"requestId": "x" * 257}, "requestId: 1 to 256 characters"),
        ({"replyTo": ["a"]}, "replyTo: expected a string"),
        ({"TAGS": ["a"]}, "TAGS: unknown field"),
        (["a"], "payload must be a JSON object"),
        ("x", "payload must be a JSON object"),
    ],
)
def test_request_errors_name_the_field(data: Any, message: str) -> None:
    with pytest.raises(BadPayload) as info:
        parse_request(data)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("items", "selectors"),
    [
        ([{"type": "starttaskid", "payload": {"taskId": "t"}}], [Selector(SelectorKind.ID, "t")]),
        ([{"type": "StartTaskTag", "payload": {"tag": "n"}}], [Selector(TAG, "n")]),
        (
            [
                {
                    "type": "starttaskcustomproperty",
                    "payload": {"customPropertyName": "g", "customPropertyValue": "v"},
                }
            ],
            [Selector(SelectorKind.CUSTOM_PROPERTY, "v", "g")],
        ),
        ([{"type": "keyvaluestore", "payload": {"anything": 1}}], []),
        ([], []),
    ],
)
def test_butler_items(items: list[Any], selectors: list[Selector]) -> None:
    assert parse_request(items, butler_array=True).selectors == tuple(selectors)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([{"type": "starttaskid"}], "[0].payload: field required"),
        ([{"type": "starttaskid", "payload": {}}], "[0].payload.taskId: field required"),
        (
            [{"type": "starttaskid", "payload": {"taskId": 1}}],
            "[0].payload.taskId: expected a string",
        ),
        (
            [{"type": "starttasktag", "payload": {"tag": "a", "x": 1}}],
            "[0].payload.x: unknown field",
        ),
        ([{"payload": {}}], "[0].type: field required"),
        (["x"], "[0]: expected an object"),
    ],
)
def test_butler_item_errors(items: list[Any], message: str) -> None:
    with pytest.raises(BadPayload) as info:
        parse_request(items, butler_array=True)
    assert str(info.value) == message


def test_butler_array_only_where_allowed() -> None:
    with pytest.raises(BadPayload, match=r"must be a JSON object$"):
        parse_request([{"type": "starttasktag", "payload": {"tag": "n"}}])


@pytest.mark.parametrize(
    ("payload", "error", "message"),
    [
        (b"x" * 101, PayloadTooLarge, "payload is 101 bytes; the limit is 100"),
        (b"\xff\xfe", BadPayload, "payload is not UTF-8 (byte 0)"),
        (
            b"{",
            BadPayload,
            "invalid JSON: Expecting property name enclosed in double quotes:"
            " line 1 column 2 (char 1)",
        ),
        (b"[" * 33, BadPayload, "JSON is nested deeper than 32 levels"),
        (
            b'{"a": NaN',
            BadPayload,
            "invalid JSON: Expecting ',' delimiter: line 1 column 10 (char 9)",
        ),
    ],
)
def test_decode_errors(payload: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        decode_json(payload, 100)
    assert str(info.value) == message


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    assert decode_json(json.dumps({"tags": ["[" * 50]}).encode(), 1000) == {"tags": ["[" * 50]}


SALES = TaskRef(id="s", name="Sales")


def outcome(
    result: TaskResult,
    final: TaskStatus | None = None,
    *,
    timed_out: bool = False,
    lost: str | None = None,
) -> TaskOutcome:
    execution = Execution("e", "s", final) if final is not None else None
    end = (
        FollowEnd(execution, timed_out=timed_out, lost=lost)
        if final is not None or timed_out or lost
        else None
    )
    return TaskOutcome(SALES, (), result, final=end)


OK_RUN = outcome(TaskResult.STARTED, TaskStatus.FINISHED_SUCCESS)
FAILED_RUN = outcome(TaskResult.STARTED, TaskStatus.FINISHED_FAIL)


@pytest.mark.parametrize(
    ("outcomes", "unmatched", "finished", "status"),
    [
        ([outcome(TaskResult.STARTED)], 0, False, ReplyStatus.OK),
        ([outcome(TaskResult.DRY_RUN)], 0, False, ReplyStatus.OK),
        ([outcome(TaskResult.STARTED)], 1, False, ReplyStatus.PARTIAL),
        ([outcome(TaskResult.STARTED), outcome(TaskResult.DENIED)], 0, False, ReplyStatus.PARTIAL),
        ([outcome(TaskResult.ALREADY_RUNNING)], 0, False, ReplyStatus.ERROR),
        ([], 1, False, ReplyStatus.ERROR),
        ([outcome(TaskResult.UNKNOWN)], 0, False, ReplyStatus.ERROR),
        ([outcome(TaskResult.STARTED), outcome(TaskResult.UNKNOWN)], 0, False, ReplyStatus.PARTIAL),
        ([outcome(TaskResult.NOT_STARTED)], 0, False, ReplyStatus.ERROR),
        ([OK_RUN], 0, True, ReplyStatus.OK),
        ([OK_RUN, OK_RUN], 0, True, ReplyStatus.OK),
        ([OK_RUN], 1, True, ReplyStatus.PARTIAL),
        ([OK_RUN, outcome(TaskResult.ALREADY_RUNNING)], 0, True, ReplyStatus.PARTIAL),
        ([OK_RUN, FAILED_RUN], 0, True, ReplyStatus.PARTIAL),
        ([FAILED_RUN], 0, True, ReplyStatus.ERROR),
        ([FAILED_RUN, FAILED_RUN], 0, True, ReplyStatus.ERROR),
        ([outcome(TaskResult.STARTED, TaskStatus.ABORTED)], 0, True, ReplyStatus.ERROR),
        ([outcome(TaskResult.STARTED, TaskStatus.SKIPPED)], 0, True, ReplyStatus.ERROR),
        ([outcome(TaskResult.STARTED, TaskStatus.ERROR)], 0, True, ReplyStatus.ERROR),
        ([outcome(TaskResult.STARTED, TaskStatus.RESET)], 0, True, ReplyStatus.ERROR),
        (
            [OK_RUN, outcome(TaskResult.STARTED, TaskStatus.STARTED, timed_out=True)],
            0,
            True,
            ReplyStatus.PARTIAL,
        ),
        # A run that ended in success but was seen only at the deadline still timed out.
        (
            [outcome(TaskResult.STARTED, TaskStatus.FINISHED_SUCCESS, timed_out=True)],
            0,
            True,
            ReplyStatus.ERROR,
        ),
        ([outcome(TaskResult.STARTED, lost="403")], 0, True, ReplyStatus.ERROR),
        ([OK_RUN, outcome(TaskResult.STARTED, lost="403")], 0, True, ReplyStatus.PARTIAL),
        ([outcome(TaskResult.DRY_RUN)], 0, True, ReplyStatus.OK),
        ([outcome(TaskResult.DENIED)], 0, True, ReplyStatus.ERROR),
    ],
)
def test_reply_status(
    outcomes: list[TaskOutcome], unmatched: int, finished: bool, status: ReplyStatus
) -> None:
    assert reply_status(outcomes, unmatched, finished=finished) is status


def test_encode_reply_is_compact_utf8() -> None:
    reply = Reply(
        ReplyStatus.PARTIAL,
        request_id="r",
        outcomes=(
            TaskOutcome(
                TaskRef(id="t", name="Rapport ☃"),
                (Selector(TAG, "Nightly"),),
                TaskResult.STARTED,
                execution_id="e",
            ),
        ),
        unmatched=(Unmatched(Selector(TAG, "x"), UnmatchedReason.NO_TASKS),),
    )
    assert (
        encode_reply(reply, "me")
        == (
            '{"requestId":"r","status":"partial","stage":"accepted","tasks":[{"taskId":"t",'
            '"taskName":"Rapport ☃","matchedBy":["tag:Nightly"],"result":"started",'
            '"executionId":"e"}],"unmatched":[{"selector":"tag:x","reason":"no_tasks"}],'
            '"instance":"me"}'
        ).encode()
    )


def finished_task(end: FollowEnd) -> dict[str, object]:
    reply = Reply(
        ReplyStatus.ERROR,
        stage="finished",
        outcomes=(TaskOutcome(SALES, (), TaskResult.STARTED, execution_id="e", final=end),),
    )
    [task] = json.loads(encode_reply(reply, "me"))["tasks"]
    assert isinstance(task, dict)
    return task


BASE = {
    "taskId": "s",
    "taskName": "Sales",
    "matchedBy": [],
    "result": "started",
    "executionId": "e",
}


@pytest.mark.parametrize(
    ("end", "fields"),
    [
        (
            FollowEnd(Execution("e", "s", TaskStatus.FINISHED_SUCCESS, duration_ms=1200)),
            {"state": "FinishedSuccess", "stateCode": 7, "durationMs": 1200},
        ),
        (
            FollowEnd(
                Execution(
                    "e",
                    "s",
                    TaskStatus.FINISHED_FAIL,
                    duration_ms=5,
                    message="newest",
                    reason="first error\nsecond error",
                )
            ),
            {
                "state": "FinishedFail",
                "stateCode": 8,
                "durationMs": 5,
                "reason": "first error\nsecond error",
            },
        ),
        (
            FollowEnd(Execution("e", "s", TaskStatus.ABORTED, message="Aborted by user")),
            {"state": "Aborted", "stateCode": 6, "durationMs": 0, "reason": "Aborted by user"},
        ),
        (
            FollowEnd(Execution("e", "s", TaskStatus.QUEUED), timed_out=True),
            {"state": "Queued", "stateCode": 3, "durationMs": 0, "timedOut": True},
        ),
        (
            FollowEnd(None, timed_out=True),
            {"state": "Unknown", "stateCode": None, "durationMs": None, "timedOut": True},
        ),
        (
            FollowEnd(Execution("e", "s", TaskStatus.STARTED, duration_ms=0), lost="denied"),
            {"state": "Unknown", "stateCode": None, "durationMs": 0, "error": "denied"},
        ),
    ],
)
def test_finished_fields(end: FollowEnd, fields: dict[str, object]) -> None:
    assert finished_task(end) == {**BASE, **fields}


@pytest.mark.parametrize(
    ("value", "expected"), [(None, None), (30, 30.0), (0.5, 0.5), (86400, 86400.0)]
)
def test_wait_timeout(value: object, expected: float | None) -> None:
    data = {} if value is None else {"waitTimeoutS": value}
    assert parse_request(data).wait_timeout_s == expected


@pytest.mark.parametrize("value", [0, -1, True, "30", [30], 1e12])
def test_wait_timeout_refused(value: object) -> None:
    with pytest.raises(BadPayload) as info:
        parse_request({"waitTimeoutS": value})
    assert str(info.value) == "waitTimeoutS: expected a number of seconds greater than 0"
