"""Payload bytes → Request, and Reply / status event → bytes.

Pure. Every refusal is a RequestError whose message names the field (`tags[2]: expected a
string`), so the error reply tells the sender exactly what to fix. Two request shapes exist:
the JSON object of DESIGN.md section 2, and Butler's REST body (a JSON array of
`{type, payload}` items), accepted on `<base>/start` only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mqtt_starter.core.errors import BadPayload, PayloadTooLarge
from mqtt_starter.core.model import (
    Execution,
    FollowEnd,
    ReloadOptions,
    Reply,
    ReplyStatus,
    Request,
    Selector,
    SelectorKind,
    TaskOutcome,
    TaskResult,
    TaskStatus,
)

MAX_ID_LENGTH = 256
# `state` of a run that can no longer be followed; it has no QRS status code.
UNKNOWN_STATE = "Unknown"
# `startedBy` of a run this daemon started; any other run is "other".
STARTED_BY_US = "mqtt-starter"
# The JSON nesting a request can need is 3 (object → list → object); anything much deeper is
# an attack on the parser, refused before json.loads recurses into it.
MAX_DEPTH = 32


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def _deepest(text: str) -> int:
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if match.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


# One compact encoder for everything published: json.dumps with options builds a new encoder
# for each call.
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def decode_json(payload: bytes, max_bytes: int) -> Any:
    """The JSON value of `payload` (None when empty), refusing oversize and malformed input."""
    if len(payload) > max_bytes:
        raise PayloadTooLarge(f"payload is {len(payload)} bytes; the limit is {max_bytes}")
    if not payload.strip():
        return None
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadPayload(f"payload is not UTF-8 (byte {exc.start})") from None
    # Counting brackets runs in C; only a payload with more of them than the limit allows can
    # be nested too deep, and only then are they walked (strings cut out first).
    if text.count("[") + text.count("{") > MAX_DEPTH and _deepest(text) > MAX_DEPTH:
        raise BadPayload(f"JSON is nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise BadPayload(f"invalid JSON: {exc}") from None


def request_id_of(data: Any) -> str | None:
    """The requestId of a payload, when it has a usable one: echoed even in error replies."""
    if isinstance(data, Mapping):
        value = data.get("requestId")
        if isinstance(value, str) and len(value) <= MAX_ID_LENGTH:
            return value
    return None


# -- the JSON request --------------------------------------------------------------------------


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise BadPayload(f"{where}: expected a string")
    return value


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list):
        raise BadPayload(f"{where}: expected a list of strings")
    return [_string(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise BadPayload(f"{where}: expected true or false")
    return value


def _seconds(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1e9:
        raise BadPayload(f"{where}: expected a number of seconds greater than 0")
    return float(value)


def _object(value: Any, where: str, fields: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise BadPayload(f"{where}: expected an object")
    unknown = [k for k in value if k not in fields]
    if unknown:
        raise BadPayload(f"{where + '.' if where else ''}{unknown[0]}: unknown field")
    return value


def _required(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise BadPayload(f"{where}.{key}: field required")
    return data[key]


def _custom_properties(value: Any, where: str) -> list[Selector]:
    if not isinstance(value, list):
        raise BadPayload(f"{where}: expected a list of {{name, value}} objects")
    result = []
    for i, item in enumerate(value):
        here = f"{where}[{i}]"
        item = _object(item, here, ("name", "value"))
        name = _string(_required(item, "name", here), f"{here}.name")
        result.append(
            Selector(
                SelectorKind.CUSTOM_PROPERTY,
                _string(_required(item, "value", here), f"{here}.value"),
                name,
            )
        )
    return result


_SELECTOR_FIELDS: dict[str, Callable[[Any, str], list[Selector]]] = {
    "taskIds": lambda v, w: [Selector(SelectorKind.ID, s) for s in _strings(v, w)],
    "tags": lambda v, w: [Selector(SelectorKind.TAG, s) for s in _strings(v, w)],
    "customProperties": _custom_properties,
    "names": lambda v, w: [Selector(SelectorKind.NAME, s) for s in _strings(v, w)],
    "spaces": lambda v, w: [Selector(SelectorKind.SPACE, s) for s in _strings(v, w)],
}
# Qlik Cloud's reload options (qlik-cloud-api.md): refused on a QRS site.
RELOAD_FIELDS = ("partial", "weight", "variables")
MAX_VARIABLES = 20
MAX_VARIABLE_LENGTH = 256
REQUEST_FIELDS = (
    "requestId",
    "replyTo",
    *_SELECTOR_FIELDS,
    "allTaskIdsMustExist",
    "wait",
    "waitTimeoutS",
    "dryRun",
    *RELOAD_FIELDS,
)


def _reload_options(data: Mapping[str, Any]) -> ReloadOptions | None:
    if not any(k in data for k in RELOAD_FIELDS):
        return None
    partial = data.get("partial")
    weight = data.get("weight")
    variables = data.get("variables")
    if partial is not None:
        partial = _flag(partial, "partial")
    if weight is not None and (
        not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 10
    ):
        raise BadPayload("weight: an integer from 1 to 10")
    pairs: tuple[tuple[str, str], ...] | None = None
    if variables is not None:
        if not isinstance(variables, Mapping):
            raise BadPayload("variables: expected an object of names and string values")
        if len(variables) > MAX_VARIABLES:
            raise BadPayload(f"variables: at most {MAX_VARIABLES} entries")
        pairs = tuple(
            (name, _string(value, f"variables.{name}")) for name, value in variables.items()
        )
        long = next((n for n, v in pairs if len(v) > MAX_VARIABLE_LENGTH), None)
        if long is not None:
            raise BadPayload(f"variables.{long}: at most {MAX_VARIABLE_LENGTH} characters")
    return ReloadOptions(partial=partial, weight=weight, variables=pairs)


def parse_request(
    data: Any, topic_selectors: Sequence[Selector] = (), *, butler_array: bool = False
) -> Request:
    """A Request from decoded JSON (`data`, None for an empty payload) and the topic's selectors.

    `butler_array` allows Butler's REST body (a JSON array), as `<base>/start` does.
    """
    if data is None or (type(data) is dict and not data):
        # The usual trigger (an empty payload, or `{}`): nothing to validate, every option
        # at its default. Taken first because every message of such a device comes here.
        return Request(selectors=tuple(topic_selectors))
    if isinstance(data, list) and butler_array:
        selectors, ignored = parse_butler_items(data)
        return Request(selectors=(*topic_selectors, *selectors), ignored=ignored)
    data = _object(data, "", REQUEST_FIELDS) if isinstance(data, Mapping) else None
    if data is None:
        raise BadPayload(
            "payload must be a JSON object"
            + (" or Butler's array of {type, payload} items" if butler_array else "")
        )
    selectors = list(topic_selectors)
    for key, parse in _SELECTOR_FIELDS.items():
        if key in data:
            selectors += parse(data[key], key)
    request_id = data.get("requestId")
    if request_id is not None:
        request_id = _string(request_id, "requestId")
        if not request_id or len(request_id) > MAX_ID_LENGTH:
            raise BadPayload(f"requestId: 1 to {MAX_ID_LENGTH} characters")
    reply_to = data.get("replyTo")
    return Request(
        selectors=tuple(selectors),
        request_id=request_id,
        reply_to=None if reply_to is None else _string(reply_to, "replyTo"),
        all_task_ids_must_exist=_flag(
            data.get("allTaskIdsMustExist", False), "allTaskIdsMustExist"
        ),
        wait=_flag(data.get("wait", False), "wait"),
        wait_timeout_s=_seconds(data.get("waitTimeoutS"), "waitTimeoutS"),
        dry_run=_flag(data.get("dryRun", False), "dryRun"),
        reload=_reload_options(data),
    )


_BUTLER_ITEMS: dict[str, tuple[tuple[str, ...], Callable[[Mapping[str, Any], str], Selector]]] = {
    "starttaskid": (
        ("taskId",),
        lambda p, w: Selector(SelectorKind.ID, _string(_required(p, "taskId", w), f"{w}.taskId")),
    ),
    "starttasktag": (
        ("tag",),
        lambda p, w: Selector(SelectorKind.TAG, _string(_required(p, "tag", w), f"{w}.tag")),
    ),
    "starttaskcustomproperty": (
        ("customPropertyName", "customPropertyValue"),
        lambda p, w: Selector(
            SelectorKind.CUSTOM_PROPERTY,
            _string(_required(p, "customPropertyValue", w), f"{w}.customPropertyValue"),
            _string(_required(p, "customPropertyName", w), f"{w}.customPropertyName"),
        ),
    ),
}


def parse_butler_items(items: list[Any]) -> tuple[list[Selector], tuple[str, ...]]:
    """Selectors from Butler's REST body, and the kinds of item it had that are not served:
    `keyvaluestore` items are said to be ignored (the reply's `ignored`), never silently."""
    selectors = []
    ignored: list[str] = []
    for i, item in enumerate(items):
        where = f"[{i}]"
        item = _object(item, where, ("type", "payload"))
        kind = _string(_required(item, "type", where), f"{where}.type")
        if kind.lower() == "keyvaluestore":
            if "keyvaluestore" not in ignored:
                ignored.append("keyvaluestore")
            continue
        spec = _BUTLER_ITEMS.get(kind.lower())
        if spec is None:
            raise BadPayload(
                f"{where}.type: unknown type {kind!r}; expected one of"
                f" {', '.join(_BUTLER_ITEMS)}, keyvaluestore"
            )
        fields, build = spec
        payload = _object(_required(item, "payload", where), f"{where}.payload", fields)
        selectors.append(build(payload, f"{where}.payload"))
    return selectors, tuple(ignored)


# -- replies and status events -----------------------------------------------------------------


def reply_status(
    outcomes: Sequence[TaskOutcome], unmatched_count: int, *, finished: bool
) -> ReplyStatus:
    """The reply's `status` (DESIGN.md section 2).

    accepted: ok when everything asked for was started, error when nothing was.
    finished: ok when that held and every started run ended FinishedSuccess, error when no
    run did, partial otherwise; a timeout and Unknown count as not successful. A finished
    reply is never better than its accepted one.
    """
    going = (TaskResult.STARTED, TaskResult.DRY_RUN)
    if finished:
        good = [
            o
            for o in outcomes
            if o.result is TaskResult.DRY_RUN
            or (o.result is TaskResult.STARTED and o.final is not None and o.final.succeeded)
        ]
    else:
        good = [o for o in outcomes if o.result in going]
    return _status(len(good), len(outcomes), unmatched_count)


def _status(good: int, tasks: int, unmatched: int) -> ReplyStatus:
    if not good:
        return ReplyStatus.ERROR
    if good == tasks and unmatched == 0:
        return ReplyStatus.OK
    return ReplyStatus.PARTIAL


def finished_from_accepted(
    accepted: Mapping[str, Any], ends: Mapping[str, FollowEnd]
) -> dict[str, Any]:
    """The `finished` reply built from the accepted reply as it was sent (a `wait` resumed
    after a restart): each started task gets its end from `ends` (by execution id); a started
    task without one is Unknown."""
    tasks = [dict(t) for t in accepted.get("tasks", ()) if isinstance(t, Mapping)]
    good = 0
    for task in tasks:
        if task.get("result") == TaskResult.DRY_RUN.value:
            good += 1
        if task.get("result") != TaskResult.STARTED.value:
            continue
        end = ends.get(str(task.get("executionId")))
        if end is None:
            end = FollowEnd(None, lost="the run could not be followed after a restart")
        task.update(_final_json(end))
        good += end.succeeded
    unmatched = accepted.get("unmatched", ())
    data = {
        **accepted,
        "status": _status(
            good, len(tasks), len(unmatched) if isinstance(unmatched, list) else 0
        ).value,
        "stage": "finished",
        "tasks": tasks,
    }
    return data


def _final_json(end: FollowEnd) -> dict[str, Any]:
    """The fields a started task gets at stage `finished`."""
    last = end.last
    if end.lost is not None or last is None:
        data: dict[str, Any] = {
            "state": UNKNOWN_STATE,
            "stateCode": None,
            "durationMs": last.duration_ms if last is not None else None,
        }
        if end.lost is not None:
            data["error"] = end.lost
    else:
        data = {
            "state": last.state_name,
            "stateCode": int(last.status),
            "durationMs": last.duration_ms,
        }
        if last.status.terminal and last.status is not TaskStatus.FINISHED_SUCCESS:
            data["reason"] = last.reason or last.message
    if end.timed_out:
        data["timedOut"] = True
    return data


def _outcome_json(outcome: TaskOutcome) -> dict[str, Any]:
    data: dict[str, Any] = {
        "taskId": outcome.task.id,
        "taskName": outcome.task.name,
        "matchedBy": [s.match_label for s in outcome.matched_by],
        "result": outcome.result,  # a StrEnum: encoded as its value, without the lookup
    }
    if outcome.execution_id is not None:
        data["executionId"] = outcome.execution_id
    if outcome.error is not None:
        data["error"] = outcome.error
    if outcome.waited_ms:
        data["waitedMs"] = outcome.waited_ms
    if outcome.final is not None:
        data.update(_final_json(outcome.final))
    return data


def reply_json(reply: Reply, instance: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "requestId": reply.request_id,
        "status": reply.status,  # StrEnums, as "result" above
        "stage": reply.stage,
    }
    if reply.error is not None:
        data["error"] = {"code": reply.error.code, "message": reply.error.message}
    else:
        data["tasks"] = [_outcome_json(o) for o in reply.outcomes]
        data["unmatched"] = [
            {"selector": u.selector.label, "reason": u.reason} for u in reply.unmatched
        ]
    if reply.notes:
        data["notes"] = list(reply.notes)
    if reply.ignored:
        data["ignored"] = list(reply.ignored)
    if reply.replayed:
        data["replayed"] = True
    data["instance"] = instance
    return data


def encode_reply(reply: Reply, instance: str) -> bytes:
    return _COMPACT.encode(reply_json(reply, instance)).encode("utf-8")


def encode_status_event(
    execution: Execution,
    task_name: str,
    request_id: str | None,
    *,
    started_by: str = STARTED_BY_US,
) -> bytes:
    return _COMPACT.encode(
        {
            "taskId": execution.task_id,
            "taskName": task_name,
            "executionId": execution.execution_id,
            "state": execution.state_name,
            "stateCode": int(execution.status),
            "requestId": request_id,
            "startedBy": started_by,
            "startTime": execution.start_time,
            "stopTime": execution.stop_time,
            "durationMs": execution.duration_ms,
            "message": execution.message,
        }
    ).encode("utf-8")


def encode_json(data: Any) -> bytes:
    return _COMPACT.encode(data).encode("utf-8")


def health_json(
    instance: str, request_id: str | None, *, reachable: bool, latency_ms: float | None
) -> dict[str, Any]:
    """The answer on `<base>/request/health` (DESIGN.md section 7)."""
    return {
        "status": "ok" if reachable else "error",
        "healthy": reachable,
        "broker": True,  # the question came through it
        "qrs": {
            "reachable": reachable,
            "latencyMs": round(latency_ms, 1) if latency_ms is not None else None,
        },
        "instance": instance,
        "requestId": request_id,
    }
