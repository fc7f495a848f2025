"""The simulated repository: tasks, execution sessions and results, the journal and faults.

The state machine of qrs-api.md section 5 runs here, one asyncio task per execution session:
Triggered → (Queued) → Started → FinishedSuccess | FinishedFail, a failed attempt with retries
left ending FinishedFail and opening a new result under the same session (Retry → Triggered …),
and stop: AbortInitiated → Aborting → Aborted. A task's `lastExecutionResult` is the live
result of its current run from Triggered on, as in real QRS. Finished executions are kept per
task up to a limit (QRS cleans up old results too), indexed by execution and result id, and the
journal is bounded, so a long benchmark does not grow the simulator. The web layer (server.py)
only translates HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from mqtt_starter.simulators.qrs.changes import ChangeIndex
from mqtt_starter.simulators.qrs.fixtures import Fixture, TaskFixture, Variants
from mqtt_starter.simulators.qrs.logs import ScriptLogs
from mqtt_starter.simulators.qrs.results import EMPTY_GUID, NEVER, Results, stable_id

TRIGGERED, STARTED, QUEUED, ABORT_INITIATED, ABORTING, ABORTED = 1, 2, 3, 4, 5, 6
FINISHED_SUCCESS, FINISHED_FAIL, RETRY = 7, 8, 10
# Short, fixed steps between states nobody scripts; long enough to be observed by a poller.
_STEP_S = 0.02
_RETRY_DELAY_S = 0.05
# taskType code and schemaPath of each fixture type (qrs-api.md section 2).
TASK_TYPES = {
    "reload": (0, "ReloadTask"),
    "external": (1, "ExternalProgramTask"),
    "usersync": (2, "UserSyncTask"),
    "distribute": (3, "DistributionTask"),
    "preload": (4, "PreloadTask"),
}
# The fields of an execution result that a task's operational.lastExecutionResult shows.
_LAST_RESULT_FIELDS = ("id", "status", "startTime", "stopTime", "duration", "details")


class StartRefused(Exception):
    """QRS answers the start with a 4xx (a user-sync task, for instance)."""

    def __init__(self, status: int, text: str) -> None:
        self.status = status
        self.text = text
        super().__init__(text)


@dataclass
class JournalEntry:
    """One request the simulator served, for tests to read."""

    method: str
    path: str
    query: dict[str, str]
    status: int = 0  # 0: no answer was sent (a hang that was abandoned, a dropped connection)
    started: float = 0.0
    ended: float | None = None
    user: str = ""  # DIRECTORY\\ID of X-Qlik-User, percent-decoded; "" when absent

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "status": self.status,
            "started": self.started,
            "ended": self.ended,
            "user": self.user,
        }


@dataclass
class Faults:
    """Faults for the next calls to /qrs; each count is used up one call at a time."""

    fail_next: int = 0
    fail_status: int = 503
    hang_next: int = 0
    hang_s: float = 3600.0
    drop_next: int = 0
    # The call takes effect, then its answer is lost: "drop" (the connection closes), "hang"
    # (no answer for hang_s) or an HTTP status sent instead of the real answer.
    lose_next: int = 0
    lose_as: str = "drop"
    delay_s: float = 0.0
    # Faults (not the delay) apply only to calls whose path contains this text; "" for all.
    path_contains: str = ""
    # Cleared: every call waits until it is set again (to see calls in flight at once).
    open: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.open.set()

    # The control endpoint's names (POST /_sim/faults) of the settable fields.
    FIELDS = {
        "failNext": "fail_next",
        "failStatus": "fail_status",
        "hangNext": "hang_next",
        "hangS": "hang_s",
        "dropNext": "drop_next",
        "loseNext": "lose_next",
        "loseAs": "lose_as",
        "delayS": "delay_s",
        "pathContains": "path_contains",
    }

    def update(self, body: Any) -> dict[str, Any] | None:
        """Set the fields `body` names; the settings after, or None when `body` is not an
        object of known fields."""
        if not isinstance(body, dict) or not set(body) <= set(self.FIELDS):
            return None
        for key, value in body.items():
            setattr(self, self.FIELDS[key], value)
        return {k: getattr(self, v) for k, v in self.FIELDS.items()}

    def take(self, path: str) -> str | None:
        if self.path_contains and self.path_contains not in path:
            return None
        for kind in ("fail", "hang", "drop", "lose"):
            count = getattr(self, f"{kind}_next")
            if count > 0:
                setattr(self, f"{kind}_next", count - 1)
                return kind
        return None


@dataclass
class SimTask:
    """A simulated task and its cached QRS shapes."""

    spec: TaskFixture
    # The result of the current or latest run, shared with the execution (so it is live).
    last_result: dict[str, Any] | None = None
    # Execution ids of this task's finished runs, oldest first (bounded by results_per_task).
    history: deque[str] = field(default_factory=deque)
    # The JSON objects are rebuilt only when the task changes (its last result), so that a
    # list call costs a filter, not a rebuild of every task.
    _cache: dict[str, dict[str, Any]] = field(default_factory=dict)

    def set_last_result(self, result: dict[str, Any]) -> None:
        self.last_result = result
        self._cache.clear()

    def changed(self) -> None:
        self._cache.clear()

    @property
    def task_type(self) -> int:
        return TASK_TYPES[self.spec.type][0]

    def cached(self, full: bool, choice_values: dict[str, list[str]]) -> dict[str, Any]:
        key = "full" if full else "condensed"
        if key not in self._cache:
            self._cache[key] = self.full(choice_values) if full else self.condensed()
        return self._cache[key]

    @property
    def id(self) -> str:
        return self.spec.id

    def condensed(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.spec.name,
            "taskType": self.task_type,
            "enabled": self.spec.enabled,
            "taskSessionTimeout": 1440,
            "maxRetries": self.spec.max_retries,
            "privileges": None,
            "operational": {
                "id": stable_id(self.id, "operational"),
                "nextExecution": NEVER,
                "lastExecutionResult": {k: self.last_result[k] for k in _LAST_RESULT_FIELDS}
                if self.last_result is not None
                else {
                    "id": stable_id(self.id, "never"),
                    "status": 0,
                    "startTime": NEVER,
                    "stopTime": NEVER,
                    "duration": 0,
                    "details": [],
                },
            },
        }

    def full(self, choice_values: dict[str, list[str]]) -> dict[str, Any]:
        data = self.condensed()
        data.update(
            {
                "tags": [
                    {"id": stable_id("tag", t), "name": t, "privileges": None}
                    for t in self.spec.tags
                ],
                "customProperties": [
                    {
                        "id": stable_id(self.id, "cp", name, value),
                        "value": value,
                        "definition": {
                            "id": stable_id("cpdef", name),
                            "name": name,
                            "valueType": "Text",
                            "choiceValues": choice_values[name],
                            "privileges": None,
                        },
                    }
                    for name, values in self.spec.custom_properties.items()
                    for value in ([values] if isinstance(values, str) else values)
                ],
                "schemaPath": TASK_TYPES[self.spec.type][1],
            }
        )
        if self.spec.type == "reload":
            data["app"] = {
                "id": stable_id("app", self.spec.app or self.spec.name),
                "name": self.spec.app or self.spec.name,
            }
        return data


@dataclass
class Session:
    """A simulated execution session: one run of a task, with its attempts."""

    id: str
    task: SimTask
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    runner: asyncio.Task[None] | None = None


class SimState:
    """Everything the simulator knows; callers are the web handlers and in-process tests."""

    def __init__(self, fixture: Fixture) -> None:
        self.tasks: dict[str, SimTask] = {t.id: SimTask(t) for t in fixture.tasks}
        self.max_concurrent = fixture.max_concurrent
        self.sessions: dict[str, Session] = {}
        self.results_per_task = fixture.results_per_task
        self.without_read_rights = {u.casefold() for u in fixture.without_read_rights}
        self.journal_limit = fixture.journal_limit
        # Every kept result, by execution (session) id and by result id (results.py).
        self.results_book = Results()
        self.executions = self.results_book.executions
        self.result_by_id = self.results_book.by_id
        self.journal: list[JournalEntry] = []
        self.faults = Faults()
        self.in_flight = 0
        self.peak_in_flight = 0
        self.started: list[str] = []  # task id of every execution session opened, in order
        self.scheduled: list[str] = []  # task id of every run a schedule started, in order
        self.script_log_api = fixture.script_log_api
        self.variants: Variants = fixture.variants
        self.script_logs = self.results_book.script_logs = ScriptLogs(lambda: self.variants)
        self.logs = self.script_logs.texts  # by result id
        self.downloads = self.script_logs.downloads
        self.changes = self.results_book.changes = ChangeIndex(
            lambda: self.variants, self.result_by_id
        )
        self._slots = asyncio.Semaphore(fixture.max_concurrent)
        self._closing = asyncio.Event()
        self._choices: dict[str, list[str]] | None = None
        self._schedules: list[asyncio.Task[None]] = []

    # -- tasks ------------------------------------------------------------------------------

    def choice_values(self) -> dict[str, list[str]]:
        """Each custom property's values over all tasks (the fixture never changes)."""
        if self._choices is not None:
            return self._choices
        values: dict[str, list[str]] = {}
        for task in self.tasks.values():
            for name, vals in task.spec.custom_properties.items():
                for v in [vals] if isinstance(vals, str) else vals:
                    if v not in values.setdefault(name, []):
                        values[name].append(v)
        self._choices = values
        return values

    def task_objects(self, kind: str, *, full: bool) -> list[dict[str, Any]]:
        """Tasks of `kind` ("task", "reloadtask" or "externalprogramtask") as QRS shows them."""
        choices = self.choice_values()
        wanted = {
            "task": tuple(TASK_TYPES),
            "reloadtask": ("reload",),
            "externalprogramtask": ("external",),
        }[kind]
        return [t.cached(full, choices) for t in self.tasks.values() if t.spec.type in wanted]

    def find_by_name(self, name: str) -> SimTask | None:
        return next(
            (t for t in self.tasks.values() if t.spec.name.casefold() == name.casefold()),
            None,
        )

    def live_session(self, task_id: str) -> Session | None:
        return next((s for s in self.sessions.values() if s.task.id == task_id), None)

    def delete(self, task: SimTask) -> None:
        """Delete the task with its live run and its execution results, as QRS does."""
        session = self.live_session(task.id)
        if session is not None and session.runner is not None:
            session.runner.cancel()
            self.sessions.pop(session.id, None)
        self.tasks.pop(task.id, None)
        self._choices = None
        for execution_id in [*task.history, *([session.id] if session else [])]:
            self._drop_execution(execution_id)

    def _drop_execution(self, execution_id: str) -> None:
        for old in self.executions.pop(execution_id, ()):
            self.result_by_id.pop(old["id"], None)
            self.logs.pop(old["id"], None)

    # -- schedules --------------------------------------------------------------------------

    def start_schedules(self) -> None:
        """Run each scheduled task's schedule (a trigger that fires every `schedule_s`)."""
        for task in self.tasks.values():
            if task.spec.schedule_s is not None:
                self._schedules.append(
                    asyncio.create_task(run_schedule(self, task), name=f"sim-schedule-{task.id}")
                )

    def fire(self, task: SimTask) -> str:
        """Start `task` as its schedule would: nobody asked through the API."""
        return self.start(task, by_schedule=True)

    # -- executions -------------------------------------------------------------------------

    def start(self, task: SimTask, *, by_schedule: bool = False) -> str:
        """Start `task`; its execution session id, or the empty GUID when it cannot start
        (disabled, already triggered or running, or not startable); StartRefused for a type
        that cannot be started."""
        if task.spec.type == "usersync":
            raise StartRefused(400, f"Task {task.id} is a user synchronization task")
        if (
            not task.spec.enabled
            or not task.spec.startable
            or (
                self.live_session(task.id) is not None
                and self.variants.running_start == "empty-guid"
            )
        ):
            return EMPTY_GUID
        session = Session(str(uuid.uuid4()), task)
        self.sessions[session.id] = session
        opened = self.scheduled if by_schedule else self.started
        if len(opened) >= self.journal_limit:
            del opened[: self.journal_limit // 2]
        opened.append(task.id)
        result = self.results_book.new(session, TRIGGERED)
        if by_schedule:
            self.results_book.detail(result, 2, "Trigger fired: scheduled start")
        session.runner = asyncio.create_task(self._run(session), name=f"sim-exec-{session.id}")
        return session.id

    def stop(self, task: SimTask) -> None:
        session = self.live_session(task.id)
        if session is not None:
            session.abort.set()

    @property
    def results(self) -> list[dict[str, Any]]:
        """Every kept execution result, oldest execution first."""
        return [r for results in self.executions.values() for r in results]

    def results_of(self, execution_id: str) -> list[dict[str, Any]]:
        return list(self.executions.get(execution_id.lower(), ()))

    async def _pause(self, session: Session, seconds: float) -> bool:
        """Wait `seconds`; True when a stop request cut the wait short."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(session.abort.wait(), seconds)
        return session.abort.is_set()

    async def _run(self, session: Session) -> None:
        spec = session.task.spec
        result = self.executions[session.id][-1]
        attempt = 0
        try:
            while True:
                self.results_book.detail(
                    result, 2, "Trying to start task. Sending task to slave scheduler"
                )
                queued = spec.outcome.queue_s > 0 or self._slots.locked()
                if queued:
                    self.results_book.set(result, QUEUED)
                    if await self._pause(session, spec.outcome.queue_s):
                        return await self._abort(session, result)
                await self._slots.acquire()
                try:
                    if session.abort.is_set():
                        return await self._abort(session, result)
                    self.results_book.set(result, STARTED)
                    if await self._pause(session, spec.outcome.duration_s):
                        return await self._abort(session, result)
                finally:
                    self._slots.release()
                failed = spec.outcome.result == "fail" or attempt < spec.outcome.failures
                if not failed:
                    self.results_book.set(result, FINISHED_SUCCESS)
                    return self._finish(session, result)
                self.results_book.detail(result, 0, spec.outcome.message or "The reload failed")
                self.results_book.set(result, FINISHED_FAIL)
                if attempt >= spec.max_retries:
                    return self._finish(session, result)
                attempt += 1
                # The failed attempt keeps its terminal result; the retry opens a new one under
                # the same session, so the session's newest result is never terminal mid-retry.
                result = self.results_book.new(session, RETRY)
                await asyncio.sleep(_RETRY_DELAY_S)
                self.results_book.set(result, TRIGGERED)
        except asyncio.CancelledError:
            self.sessions.pop(session.id, None)
            raise

    async def _abort(self, session: Session, result: dict[str, Any]) -> None:
        for status in (ABORT_INITIATED, ABORTING):
            self.results_book.set(result, status)
            await asyncio.sleep(_STEP_S)
        self.results_book.set(result, ABORTED)
        self._finish(session, result)

    def _finish(self, session: Session, result: dict[str, Any]) -> None:
        self.sessions.pop(session.id, None)
        history = session.task.history
        history.append(session.id)
        while len(history) > self.results_per_task:
            self._drop_execution(history.popleft())

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    async def pause(self, seconds: float) -> None:
        """Sleep for a fault (delay, hang), cut short when the simulator stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def close(self) -> None:
        self._closing.set()
        runners = [s.runner for s in self.sessions.values() if s.runner is not None]
        runners += self._schedules
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)

    # -- journal ------------------------------------------------------------------------------

    def record(self, entry: JournalEntry) -> None:
        if len(self.journal) >= self.journal_limit:
            del self.journal[: self.journal_limit // 2]
        self.journal.append(entry)

    def reset_journal(self) -> None:
        self.journal.clear()
        self.started.clear()
        self.scheduled.clear()
        self.peak_in_flight = self.in_flight


async def run_schedule(state: SimState, task: SimTask) -> None:
    """Fire `task` every `schedule_s` while it exists and the simulator runs."""
    assert task.spec.schedule_s is not None
    while state.tasks.get(task.id) is task:
        await state.pause(task.spec.schedule_s)
        if state.closing:
            return
        if state.tasks.get(task.id) is task:
            state.fire(task)
