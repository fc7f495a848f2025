"""The Backend for a client-managed Sense site (QRS): finding tasks and starting them.

Tasks are found with one filtered query per chunk of selectors; a start is never sent twice
when the first may have reached QRS: a lost answer (QrsAnswerLost) or a declined start (the
empty GUID) is followed by a re-read of the task, and the reply says what was found. Runs and
script logs are qrs_runs.py's; xrfkey, the user header, certificates and the proxy's JWT and
session are qrs_api.py's; retries, TLS and error mapping the shared transport's (http.py).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from loguru import logger

from mqtt_starter.config import QrsSettings
from mqtt_starter.core.errors import (
    QrsAnswerLost,
    QrsAuthError,
    QrsError,
    QrsRequestError,
)
from mqtt_starter.core.model import (
    Execution,
    ReloadOptions,
    Selector,
    SelectorKind,
    StartResult,
    TaskRef,
    TaskResult,
)
from mqtt_starter.core.qrs_query import (
    EMPTY_GUID,
    normalize_guid,
    parse_task,
    result_filter,
    task_filters,
)
from mqtt_starter.core.start_check import explain_declined, lost_unknown, run_after
from mqtt_starter.sites.http import Observer
from mqtt_starter.sites.qrs_api import QrsApi
from mqtt_starter.sites.qrs_runs import QrsRuns

__all__ = ["Observer", "QrsClient"]


class QrsClient:
    """The Backend for a client-managed Sense site: finding and starting tasks here, runs in
    qrs_runs.py, QRS's access rules in qrs_api.py.

    `await client.start()` once, then the operations; `await client.close()` at the end.
    """

    site = "qrs"
    unsupported = frozenset({SelectorKind.SPACE})

    def __init__(
        self,
        settings: QrsSettings,
        *,
        observer: Observer | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.api = QrsApi(settings, observer=observer, rng=rng, clock=clock)
        self.runs = QrsRuns(self.api)

    @property
    def last_success(self) -> float | None:
        """Monotonic time of the last call QRS answered."""
        return self.api.last_success

    async def start(self) -> None:
        """Load certificates and the token (ConfigError when they cannot be used)."""
        await self.api.start()

    async def close(self) -> None:
        await self.api.close()

    async def __aenter__(self) -> QrsClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- finding and starting tasks ----------------------------------------------------------------

    async def about(self) -> dict[str, Any]:
        data = await self.api.json("GET", "about")
        return data if isinstance(data, dict) else {}

    async def task_count(self) -> int | None:
        data = await self.api.json("GET", "task/count")
        value = data.get("value") if isinstance(data, dict) else None
        return value if isinstance(value, int) else None

    async def find_tasks(self, selectors: Sequence[Selector]) -> list[TaskRef]:
        """Candidate tasks for `selectors`: one query per chunk of selectors, not per task."""
        found: dict[str, TaskRef] = {}
        for text in task_filters(selectors):
            data = await self.api.json("GET", "task/full", {"filter": text})
            for task in self._tasks(data):
                found.setdefault(task.id, task)
        return list(found.values())

    @staticmethod
    def _tasks(data: Any) -> list[TaskRef]:
        """Tasks from a QRS list answer; anything that is not a task with a GUID is passed over."""
        items = data if isinstance(data, list) else []
        return [t for t in (parse_task(i) for i in items if isinstance(i, dict)) if t is not None]

    async def all_tasks(self) -> list[TaskRef]:
        return self._tasks(await self.api.json("GET", "task/full"))

    async def task(self, task_id: str) -> TaskRef | None:
        """The task's current state (tags, enabled, last execution), None when it is unknown."""
        tasks = await self.find_tasks([Selector(SelectorKind.ID, task_id)])
        return tasks[0] if tasks else None

    async def start_task(self, task: TaskRef, options: ReloadOptions | None = None) -> StartResult:
        """Start `task` (as read before the start) and say what became of it.

        Never sends a start twice when the first may have reached QRS: a lost answer or a
        declined start (the empty GUID) is followed by a re-read of the task.
        """
        path = f"task/{task.id}/start/synchronous"
        try:
            data = await self.api.json("POST", path, repeatable=False)
        except QrsAnswerLost as exc:
            return await self._after_lost_start(task, str(exc))
        except (QrsRequestError, QrsAuthError) as exc:
            if exc.status is None or not exc.detail:
                # Refused before or without a text of QRS's own (TLS, a proxy's login page):
                # the message says why and what to change.
                return StartResult(TaskResult.FAILED, error=str(exc))
            return StartResult(
                TaskResult.FAILED,
                error=f"QRS refused to start this {task.type_name} task:"
                f" HTTP {exc.status} {exc.detail}".rstrip(),
            )
        except QrsError as exc:
            return StartResult(TaskResult.FAILED, error=str(exc))
        value = data.get("value") if isinstance(data, dict) else None
        session = normalize_guid(value) if isinstance(value, str) else None
        if session is not None and session != EMPTY_GUID:
            return StartResult(TaskResult.STARTED, execution_id=session)
        try:
            now = await self.task(task.id)
        except QrsError as exc:
            return StartResult(
                TaskResult.NOT_STARTED,
                error=f"QRS did not start the task, and re-reading it failed: {exc}",
            )
        return explain_declined(now)

    async def _after_lost_start(self, before: TaskRef, why: str) -> StartResult:
        try:
            now = await self.task(before.id)
            result_id = run_after(before, now)
            if result_id is None:
                return lost_unknown(why)
            found = await self.runs.executions({"filter": result_filter(result_id)})
        except QrsError as exc:
            return lost_unknown(f"{why}; re-reading the task failed: {exc}")
        execution_id = next((e.execution_id for e in found if e.execution_id), None)
        if execution_id is None:
            return StartResult(
                TaskResult.STARTED,
                error="the answer to the start was lost; a run began after it, but its"
                " execution id cannot be read",
            )
        logger.info(
            "the answer to starting task {} was lost ({}); it runs as execution {}",
            before.id,
            why,
            execution_id,
        )
        return StartResult(TaskResult.STARTED, execution_id=execution_id)

    # -- runs (qrs_runs.py) ---------------------------------------------------------------------

    @property
    def date_offset_s(self) -> float:
        return self.runs.date_offset_s

    @property
    def date_note(self) -> str:
        return self.runs.date_note

    async def calibrate_dates(self) -> bool:
        return await self.runs.calibrate_dates()

    async def execution_results(self, execution_id: str) -> list[Execution]:
        return await self.runs.execution_results(execution_id)

    async def executions_of(self, execution_ids: Sequence[str]) -> list[Execution]:
        return await self.runs.executions_of(execution_ids)

    async def changed_executions(self, since: str) -> list[Execution]:
        return await self.runs.changed_executions(since)

    async def script_log_tail(self, task: TaskRef, execution: Execution, lines: int) -> str | None:
        return await self.runs.script_log_tail(task, execution, lines)

    async def execution_alive(self, execution_id: str) -> bool:
        return await self.runs.execution_alive(execution_id)
