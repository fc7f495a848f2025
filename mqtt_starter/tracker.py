"""Follows one execution to its end, emitting each state change it observes.

Polls `/qrs/executionresult/full` every `poll_interval_s` (one asyncio task per execution, no
busy loop). The newest attempt tells the state; when it is terminal, the execution session is
asked once more, since a retry opens a new result under the same session: only a gone session
(404) ends the run. Following always ends (qrs-api.md section 4):
- at the run's final state;
- at the deadline, with the last state seen (`timed_out`): runs can hang in Triggered or
  Queued after a scheduler restart;
- as Unknown (`lost`) when QRS no longer lets it be followed: a refusal (401/403, another 4xx),
  or no result at all once the session has ended (a user without read rights on
  ExecutionResult gets `[]`, not an error).
QRS being briefly unreachable is logged and polling goes on, up to the deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from loguru import logger

from .backend import Backend
from .core.errors import QrsAuthError, QrsRequestError, QrsUnavailable
from .core.model import Execution, FollowEnd, TaskRef
from .core.qrs_query import latest_execution

OnChange = Callable[[Execution], Awaitable[None]]


class _Ended(Exception):
    def __init__(self, end: FollowEnd) -> None:
        self.end = end


class Tracker:
    def __init__(
        self,
        qrs: Backend,
        poll_interval_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._qrs = qrs
        self._interval = poll_interval_s
        self._clock = clock

    async def follow(
        self,
        task: TaskRef,
        execution_id: str,
        on_change: OnChange | None = None,
        *,
        timeout_s: float,
    ) -> FollowEnd:
        """How the execution ended; `on_change` is awaited for each new state seen."""
        deadline = self._clock() + timeout_s
        last: Execution | None = None
        seen: tuple[int, int] | None = None
        while True:
            try:
                results = await self._results(execution_id, last)
                latest = latest_execution(results)
                if latest is not None:
                    last = latest
                    state = (len(results), int(latest.status))
                    if state != seen:
                        seen = state
                        if on_change is not None:
                            await on_change(latest)
                if latest is None or latest.status.terminal:
                    await self._check_session(execution_id, latest, last)
            except QrsUnavailable as exc:
                logger.warning("following execution {} of task {}: {}", execution_id, task.id, exc)
            except _Ended as ended:
                return ended.end
            remaining = deadline - self._clock()
            if remaining <= 0:
                logger.warning(
                    "stopped following execution {} of task {} after {:.0f} s: last state {}",
                    execution_id,
                    task.id,
                    timeout_s,
                    last.status.qrs_name if last else "none seen",
                )
                return FollowEnd(last, timed_out=True)
            await asyncio.sleep(min(self._interval, remaining))

    async def _results(self, execution_id: str, last: Execution | None) -> list[Execution]:
        try:
            return await self._qrs.execution_results(execution_id)
        except (QrsAuthError, QrsRequestError) as exc:
            raise _Ended(
                FollowEnd(last, lost=f"QRS refuses to show the execution: {exc}")
            ) from None

    async def _check_session(
        self, execution_id: str, latest: Execution | None, last: Execution | None
    ) -> None:
        """Ends following (`_Ended`) when the session is gone, or cannot be read."""
        try:
            alive = await self._qrs.execution_alive(execution_id)
        except (QrsAuthError, QrsRequestError) as exc:
            if latest is not None:
                # The run's final state is known; whether a retry follows cannot be.
                raise _Ended(FollowEnd(latest)) from None
            raise _Ended(
                FollowEnd(last, lost=f"QRS shows no result and refuses the session: {exc}")
            ) from None
        if alive:
            return
        if latest is not None:
            raise _Ended(FollowEnd(latest))
        raise _Ended(
            FollowEnd(
                last,
                lost="QRS shows no result for the execution and its session has ended"
                " (no read rights on execution results, or they were deleted)",
            )
        )
