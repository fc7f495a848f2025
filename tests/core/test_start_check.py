"""What a re-read says about a declined start or a lost answer (qrs-api.md section 3)."""

from __future__ import annotations

import pytest

from mqtt_starter.core.model import StartResult, TaskRef, TaskResult, TaskStatus
from mqtt_starter.core.start_check import explain_declined, lost_unknown, run_after

BEFORE = TaskRef(id="t", name="Sales", last_result_id="r1", last_status=TaskStatus.FINISHED_SUCCESS)


def task(status: TaskStatus, *, enabled: bool = True, result_id: str = "r1") -> TaskRef:
    return TaskRef(
        id="t", name="Sales", enabled=enabled, last_status=status, last_result_id=result_id
    )


@pytest.mark.parametrize(
    "status",
    [
        TaskStatus.TRIGGERED,
        TaskStatus.QUEUED,
        TaskStatus.STARTED,
        TaskStatus.RETRY,
        TaskStatus.ABORT_INITIATED,
        TaskStatus.ABORTING,
    ],
)
def test_declined_while_running(status: TaskStatus) -> None:
    assert explain_declined(task(status)) == StartResult(TaskResult.ALREADY_RUNNING)


def test_declined_and_disabled() -> None:
    assert explain_declined(task(TaskStatus.FINISHED_FAIL, enabled=False)) == StartResult(
        TaskResult.DISABLED
    )


@pytest.mark.parametrize(
    "status", [TaskStatus.NEVER_STARTED, TaskStatus.FINISHED_SUCCESS, TaskStatus.ERROR]
)
def test_declined_without_a_reason(status: TaskStatus) -> None:
    assert explain_declined(task(status)) == StartResult(
        TaskResult.NOT_STARTED,
        error="QRS did not start the task and gave no reason; it is enabled and its last run"
        f" is {status.qrs_name}: no scheduler available, or the app unavailable?",
    )


def test_declined_and_gone() -> None:
    assert explain_declined(None) == StartResult(
        TaskResult.NOT_STARTED, error="QRS did not start the task, and no longer lists it"
    )


@pytest.mark.parametrize(
    ("now", "found"),
    [
        (task(TaskStatus.TRIGGERED, result_id="r2"), "r2"),
        (task(TaskStatus.FINISHED_SUCCESS, result_id="r2"), "r2"),  # began and ended already
        (task(TaskStatus.FINISHED_SUCCESS, result_id="r1"), None),  # the run seen before
        (task(TaskStatus.NEVER_STARTED, result_id="r9"), None),
        (task(TaskStatus.TRIGGERED, result_id=""), None),
        (None, None),
    ],
)
def test_a_run_after_the_request(now: TaskRef | None, found: str | None) -> None:
    assert run_after(BEFORE, now) == found


def test_lost_and_unknown_says_why() -> None:
    assert lost_unknown("timeout") == StartResult(
        TaskResult.UNKNOWN,
        error="the answer to the start was lost (timeout) and QRS shows no run that began"
        " after it: the task may or may not run",
    )
