"""Expected replies built from what the simulator really did."""

from __future__ import annotations

import re
import uuid
from typing import Any

from mqtt_starter.simulators.qrs.fixtures import Fixture, Outcome, TaskFixture
from mqtt_starter.simulators.qrs.state import SimState

SALES = "11111111-1111-4111-8111-111111111111"
STOCK = "22222222-2222-4222-8222-222222222222"
FORECAST = "33333333-3333-4333-8333-333333333333"
BUDGET = "44444444-4444-4444-8444-444444444444"
ARCHIVE = "55555555-5555-4555-8555-555555555555"
QUARTER = "66666666-6666-4666-8666-666666666666"
DECOY = "77777777-7777-4777-8777-777777777777"
EXPORT = "88888888-8888-4888-8888-888888888888"
LONG = "99999999-9999-4999-8999-999999999999"
NAMES = {
    SALES: "Reload Sales",
    STOCK: "Reload Stock",
    FORECAST: "Reload Forecast",
    BUDGET: "Reload Budget",
    ARCHIVE: "Reload Archive",
    QUARTER: "Quarter report",
    DECOY: "CP decoy",
    EXPORT: "Export to Data Lake",
    LONG: "Long Reload",
}
# The daemon's client id, which its replies name, and its base topic: on the shared broker the
# `broker` fixture sets the test's own (conftest.py); read them as `helpers.INSTANCE` and
# `helpers.BASE`.
INSTANCE = "starter-test"
BASE = "butler"


def on_base(text: str) -> str:
    """`text` (a topic, or a message naming topics) with the default base topic `butler`
    put on the test's own: for data written before a test runs (parametrize, tables)."""
    return re.sub(r"(?<![\w/])butler/", f"{BASE}/", text)


def executions(state: SimState, task_id: str) -> list[str]:
    """Execution session ids the simulator opened for a task, in order."""
    seen: list[str] = []
    for result in state.results:
        if result["taskID"] == task_id and result["executionID"] not in seen:
            seen.append(result["executionID"])
    return seen


def line(
    sim: SimState | None, task_id: str, matched: list[str], result: str, **extra: Any
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "taskId": task_id,
        "taskName": NAMES[task_id],
        "matchedBy": matched,
        "result": result,
    }
    if result == "started":
        assert sim is not None
        [execution_id] = executions(sim, task_id)[-1:]
        data["executionId"] = execution_id
    data.update(extra)
    return data


def reply(
    status: str,
    tasks: list[dict[str, Any]],
    unmatched: list[dict[str, str]] | None = None,
    request_id: str | None = None,
    stage: str = "accepted",
) -> dict[str, Any]:
    return {
        "requestId": request_id,
        "status": status,
        "stage": stage,
        "tasks": tasks,
        "unmatched": unmatched or [],
        "instance": INSTANCE,
    }


def only_nightly_started(sim: SimState) -> dict[str, Any]:
    """The answer to `tag/startTask1` under `policy.allow: {tags: [Nightly]}`."""
    return reply(
        "partial",
        [
            line(sim, SALES, ["tag:startTask1"], "started"),
            line(None, EXPORT, ["tag:startTask1"], "denied", error="not in policy.allow"),
        ],
    )


def refusal(code: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    return {
        "requestId": request_id,
        "status": "error",
        "stage": "accepted",
        "error": {"code": code, "message": message},
        "instance": INSTANCE,
    }


def task_calls(state: SimState) -> list[tuple[str, str, str]]:
    """The daemon's task lookups and starts (not its polling), as (method, path, filter)."""
    return [
        (e.method, e.path, e.query.get("filter", ""))
        for e in state.journal
        if e.path.startswith("/qrs/task")
    ]


def many_tasks(prefix: str, count: int, marker: int, duration_s: float) -> Fixture:
    """`count` tasks named `<prefix> 000`... tagged with the lower-case prefix; their ids are
    `many_task_ids(count, marker)`."""
    return Fixture(
        max_concurrent=1000,
        tasks=[
            TaskFixture(
                id=task_id,
                name=f"{prefix} {i:03d}",
                tags=[prefix.lower()],
                outcome=Outcome(duration_s=duration_s),
            )
            for i, task_id in enumerate(many_task_ids(count, marker))
        ],
    )


def many_task_ids(count: int, marker: int) -> list[str]:
    return [str(uuid.UUID(int=marker << 120 | i, version=4)) for i in range(count)]
