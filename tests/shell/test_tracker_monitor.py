"""The follower loop with the monitor's query as its source, against fakes of the backend and
of the monitor: the source serves followers, and its failures do not end them."""

from __future__ import annotations

from dataclasses import dataclass, field

from mqtt_starter.core.errors import QrsRequestError, QrsUnavailable
from mqtt_starter.core.model import Execution, TaskRef, TaskStatus
from mqtt_starter.service.follow import Tracker
from tests.fakes import FakeBackend

TASK = TaskRef(id="0c000000-0000-4000-8000-000000000001", name="Watched")


@dataclass
class FakeSource:
    """Answers each poll with the next scripted answer (or raises it)."""

    answers: list[list[Execution] | Exception]
    interval_s: float = 0.01
    active: bool = True
    polls: int = 0
    seen: list[list[Execution]] = field(default_factory=list)

    async def poll(self) -> list[Execution]:
        self.polls += 1
        answer = self.answers[min(self.polls, len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def covers(self, task: TaskRef) -> bool:
        return True


async def started(backend: FakeBackend) -> str:
    result = await backend.start_task(TASK)
    assert result.execution_id is not None
    return result.execution_id


async def test_the_monitors_answer_serves_the_follower() -> None:
    backend = FakeBackend.of(TASK)
    execution_id = await started(backend)
    ended = Execution(execution_id, TASK.id, TaskStatus.FINISHED_SUCCESS, result_id="r1")
    source = FakeSource([[ended]])
    tracker = Tracker(backend, 0.01)
    tracker.attach(source)
    backend.runs[execution_id].polls = 99  # the session is gone
    try:
        end = await tracker.follow(TASK, execution_id, timeout_s=30)
    finally:
        await tracker.close()
    assert end.succeeded and end.last == ended
    assert ("executions_of", (execution_id,)) not in backend.calls
    assert tracker.covered(TASK)


async def test_a_refused_monitor_query_leaves_the_followers_to_their_own() -> None:
    backend = FakeBackend.of(TASK)
    execution_id = await started(backend)
    source = FakeSource([QrsRequestError("HTTP 400 Cannot parse the expression", status=400)])
    tracker = Tracker(backend, 0.01)
    tracker.attach(source)
    try:
        end = await tracker.follow(TASK, execution_id, timeout_s=30)
    finally:
        await tracker.close()
    assert end.succeeded
    assert ("executions_of", (execution_id,)) in backend.calls


async def test_deadlines_pass_while_qrs_is_unavailable_to_the_monitor() -> None:
    backend = FakeBackend.of(TASK)
    execution_id = await started(backend)
    ticks = iter(range(0, 10_000, 5))  # each look at the clock is 5 s later
    source = FakeSource([QrsUnavailable("QRS is down")])
    tracker = Tracker(backend, 0.01, clock=lambda: float(next(ticks)))
    tracker.attach(source)
    try:
        end = await tracker.follow(TASK, execution_id, timeout_s=10)
    finally:
        await tracker.close()
    assert end.timed_out and end.last is None
    assert source.polls >= 1


async def test_an_inactive_monitor_serves_nobody() -> None:
    backend = FakeBackend.of(TASK)
    execution_id = await started(backend)
    source = FakeSource([[]], active=False)
    tracker = Tracker(backend, 0.01)
    tracker.attach(source)
    end = await tracker.follow(TASK, execution_id, timeout_s=30)
    assert end.succeeded and source.polls == 0
    # Not polling here does not mean nobody publishes: another instance may monitor, and
    # the source says so.
    assert tracker.covered(TASK)
