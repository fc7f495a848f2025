"""Fakes of the project's own interfaces: the backend (a Qlik site), the publisher and the
broker link.

The fake backend keeps a journal of the calls it got, answers starts as scripted, and plays
each execution through a scripted list of states, one state per poll, so that following is
deterministic and fast.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mqtt_starter.core.errors import MqttLinkError, QrsUnavailable
from mqtt_starter.core.model import (
    Execution,
    ReloadOptions,
    Selector,
    SelectorKind,
    StartResult,
    TaskRef,
    TaskResult,
    TaskStatus,
)
from mqtt_starter.core.qrs_query import selector_matches

SUCCESS = (TaskStatus.TRIGGERED, TaskStatus.STARTED, TaskStatus.FINISHED_SUCCESS)
FAILURE = (TaskStatus.TRIGGERED, TaskStatus.STARTED, TaskStatus.FINISHED_FAIL)


@dataclass
class Run:
    task_id: str
    states: Sequence[TaskStatus]
    polls: int = 0
    reason: str = ""

    def snapshot(self, execution_id: str) -> Execution:
        status = self.states[min(self.polls, len(self.states) - 1)]
        self.polls += 1
        failed = status is TaskStatus.FINISHED_FAIL
        return Execution(
            execution_id,
            self.task_id,
            status,
            duration_ms=100 if status.terminal else 0,
            message=self.reason if failed else f"state {status.qrs_name}",
            reason=self.reason if failed else "",
            result_id=f"r-{execution_id}",
        )

    @property
    def over(self) -> bool:
        return self.polls >= len(self.states)


@dataclass
class FakeBackend:
    tasks: dict[str, TaskRef]
    # task id → the states each of its runs goes through (default: success)
    scripts: dict[str, Sequence[TaskStatus]] = field(default_factory=dict)
    # task id → what a start answers instead of starting
    refusals: dict[str, StartResult] = field(default_factory=dict)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    runs: dict[str, Run] = field(default_factory=dict)
    unavailable: int = 0  # the next N find_tasks calls raise QrsUnavailable
    broken: int = 0  # the next N find_tasks calls raise a bug (RuntimeError)
    gate: asyncio.Event | None = None  # when set, find_tasks waits for it
    waiting: int = 0  # find_tasks calls waiting at the gate now
    closed: bool = False
    last_success: float | None = None
    site: str = "qrs"
    unsupported: frozenset[SelectorKind] = frozenset({SelectorKind.SPACE})
    options: list[ReloadOptions | None] = field(default_factory=list)  # of each start
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    @classmethod
    def of(cls, *tasks: TaskRef, **options: Any) -> FakeBackend:
        return cls({t.id: t for t in tasks}, **options)

    async def about(self) -> dict[str, Any]:
        self.calls.append(("about", None))
        return {"buildVersion": "fake"}

    async def task_count(self) -> int | None:
        return len(self.tasks)

    date_note: str = "the fake reads filter dates as UTC"

    async def calibrate_dates(self) -> bool:
        self.calls.append(("calibrate_dates", None))
        return True

    async def find_tasks(self, selectors: Sequence[Selector]) -> list[TaskRef]:
        self.calls.append(("find_tasks", tuple(s.label for s in selectors)))
        if self.gate is not None:
            self.waiting += 1
            try:
                await self.gate.wait()
            finally:
                self.waiting -= 1
        if self.unavailable:
            self.unavailable -= 1
            raise QrsUnavailable("QRS GET /qrs/task/full failed after 5 attempt(s): HTTP 503")
        if self.broken:
            self.broken -= 1
            raise RuntimeError("a bug")
        return [t for t in self.tasks.values() if any(selector_matches(s, t) for s in selectors)]

    async def all_tasks(self) -> list[TaskRef]:
        return list(self.tasks.values())

    async def task(self, task_id: str) -> TaskRef | None:
        return self.tasks.get(task_id)

    async def start_task(self, task: TaskRef, options: ReloadOptions | None = None) -> StartResult:
        assert not self.closed, "a start on a closed backend"
        self.calls.append(("start_task", task.id))
        self.options.append(options)
        if task.id in self.refusals:
            return self.refusals[task.id]
        execution_id = f"00000000-0000-4000-8000-{next(self._ids):012d}"
        self.runs[execution_id] = Run(task.id, self.scripts.get(task.id, SUCCESS))
        return StartResult(TaskResult.STARTED, execution_id=execution_id)

    async def execution_results(self, execution_id: str) -> list[Execution]:
        assert not self.closed, "following on a closed backend"
        self.calls.append(("execution_results", execution_id))
        run = self.runs.get(execution_id)
        return [run.snapshot(execution_id)] if run is not None else []

    async def execution_alive(self, execution_id: str) -> bool:
        run = self.runs.get(execution_id)
        return run is not None and not run.over

    async def executions_of(self, execution_ids: Sequence[str]) -> list[Execution]:
        assert not self.closed, "following on a closed backend"
        self.calls.append(("executions_of", tuple(execution_ids)))
        return [self.runs[i].snapshot(i) for i in execution_ids if i in self.runs]

    async def changed_executions(self, since: str) -> list[Execution]:
        self.calls.append(("changed_executions", since))
        return []

    async def script_log_tail(self, task: TaskRef, execution: Execution, lines: int) -> str | None:
        return None

    async def close(self) -> None:
        self.closed = True

    def started(self) -> list[str]:
        return [arg for name, arg in self.calls if name == "start_task"]


@dataclass
class FakePublisher:
    sent: list[tuple[str, bytes]] = field(default_factory=list)

    async def publish(self, topic: str, payload: bytes) -> None:
        self.sent.append((topic, payload))


@dataclass
class Published:
    """One message as the fake link's broker got it."""

    topic: str
    payload: bytes
    retain: bool = False
    correlation_data: bytes | None = None

    def json(self) -> Any:
        return json.loads(self.payload)


class FakeLink:
    """The broker link, in-process: what is published is kept in order; `up()` and `down()`
    stand for the connection, and a publish while down fails as the real link's does."""

    def __init__(self, *, connected: bool = True) -> None:
        self.connected = asyncio.Event()
        if connected:
            self.connected.set()
        self.published: list[Published] = []
        self.refuse_next = 0  # the next publishes fail although connected (a broker drop)

    def up(self) -> None:
        self.connected.set()

    def down(self) -> None:
        self.connected.clear()

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        correlation_data: bytes | None = None,
    ) -> None:
        if not self.connected.is_set():
            raise MqttLinkError("not connected to the broker")
        if self.refuse_next:
            self.refuse_next -= 1
            raise MqttLinkError("the broker dropped the connection")
        self.published.append(Published(topic, payload, retain, correlation_data))

    def on(self, prefix: str) -> list[Published]:
        return [p for p in self.published if p.topic.startswith(prefix)]
