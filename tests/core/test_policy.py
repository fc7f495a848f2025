"""Allow-list, per-task decisions, the expiring memory behind dedupe, and debounce."""

from __future__ import annotations

import dataclasses

import pytest

from mqtt_starter.core.model import (
    CustomPropertyValue,
    ResolvedTask,
    TaskRef,
    TaskResult,
    TaskStatus,
)
from mqtt_starter.core.policy import AllowList, Debouncer, ExpiringMemory, decide

TASK = TaskRef(
    id="6ca1c5f2-2742-44d5-8adf-d6cba3701a4e",
    name="Reload Sales",
    tags=("Nightly",),
    custom_properties=(CustomPropertyValue("taskGroup", "tasks2"),),
)


@pytest.mark.parametrize(
    ("allow", "allowed"),
    [
        (AllowList.build(["6CA1C5F2-2742-44D5-8ADF-D6CBA3701A4E "], [], []), True),
        (AllowList.build([], ["nightly"], []), True),
        (AllowList.build([], [], [("TASKGROUP", "Tasks2")]), True),
        (AllowList.build([], [], [("taskGroup", "tasks1")]), False),
        (AllowList.build([], [], [("Other", "tasks2")]), False),
        (AllowList.build(["other"], ["Weekly"], []), False),
        (AllowList(), False),
    ],
)
def test_allow_list(allow: AllowList, allowed: bool) -> None:
    assert allow.allows(TASK) is allowed


def resolved(**changes: object) -> ResolvedTask:
    return ResolvedTask(dataclasses.replace(TASK, **changes), ())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("task", "allow", "start_running", "dry_run", "start", "result"),
    [
        (resolved(), None, False, False, True, None),
        (resolved(), AllowList(), False, False, False, TaskResult.DENIED),
        (resolved(enabled=False), None, False, False, False, TaskResult.DISABLED),
        (resolved(enabled=False), AllowList(), False, False, False, TaskResult.DENIED),
        (
            resolved(last_status=TaskStatus.STARTED),
            None,
            False,
            False,
            False,
            TaskResult.ALREADY_RUNNING,
        ),
        (resolved(last_status=TaskStatus.STARTED), None, True, False, True, None),
        (resolved(last_status=TaskStatus.FINISHED_FAIL), None, False, False, True, None),
        (resolved(), None, False, True, False, TaskResult.DRY_RUN),
        (
            resolved(last_status=TaskStatus.QUEUED),
            None,
            False,
            True,
            False,
            TaskResult.ALREADY_RUNNING,
        ),
    ],
)
def test_decide(
    task: ResolvedTask,
    allow: AllowList | None,
    start_running: bool,
    dry_run: bool,
    start: bool,
    result: TaskResult | None,
) -> None:
    decision = decide(task, allow, start_running=start_running, dry_run=dry_run)
    assert (decision.start, decision.result) == (start, result)


@pytest.mark.parametrize(
    ("status", "running"),
    [(TaskStatus(code), code in (1, 2, 3, 4, 5, 10)) for code in range(15)],
)
def test_running_states(status: TaskStatus, running: bool) -> None:
    decision = decide(resolved(last_status=status), None, start_running=False, dry_run=False)
    assert (decision.result is TaskResult.ALREADY_RUNNING) is running


def test_expiring_memory() -> None:
    memory: ExpiringMemory[str, int] = ExpiringMemory(10, capacity=2)
    memory.put("a", 1, now=0)
    assert memory.get("a", now=9.9) == 1
    assert memory.get("a", now=10) is None
    memory.put("a", 1, now=20)
    memory.put("b", 2, now=21)
    memory.put("c", 3, now=22)
    assert (memory.get("a", 22), memory.get("b", 22), memory.get("c", 22)) == (None, 2, 3)
    assert len(memory) == 2


def test_debouncer_is_leading_edge() -> None:
    debouncer = Debouncer()
    assert [debouncer.admit("k", 30, t) for t in (0, 1, 29.9, 30, 31, 61)] == [
        True,
        False,
        False,
        True,
        False,
        True,
    ]
    assert debouncer.admit("other", 30, 1)
    assert all(debouncer.admit("k", 0, t) for t in (100, 100, 100))
