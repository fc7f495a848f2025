"""Follows one execution to its end, emitting each state change it observes.

Polls execution results every `poll_interval_s` (one asyncio task per execution, no busy loop).
The newest attempt tells the state; when it is terminal, the execution session is asked once
more, since a retry opens a new result under the same session: only a gone session (404) ends.
QRS errors while following are logged and polling goes on: an execution does not stop
because QRS was briefly unreachable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from loguru import logger

from .errors import QrsError, QrsRequestError
from .model import Execution, TaskRef
from .qrs_client import QrsClient
from .qrs_query import latest_execution

OnChange = Callable[[Execution], Awaitable[None]]


class Tracker:
    def __init__(self, qrs: QrsClient, poll_interval_s: float) -> None:
        self._qrs = qrs
        self._interval = poll_interval_s
        self.following = 0

    async def _session_alive(self, execution_id: str) -> bool:
        try:
            await self._qrs.call("GET", f"executionsession/{execution_id}")
        except QrsRequestError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def follow(
        self, task: TaskRef, execution_id: str, on_change: OnChange | None = None
    ) -> Execution:
        """The final execution result; `on_change` is awaited for each new state seen."""
        self.following += 1
        try:
            seen: tuple[int, int] | None = None
            while True:
                try:
                    results = await self._qrs.execution_results(execution_id)
                    latest = latest_execution(results)
                    if latest is not None:
                        state = (len(results), int(latest.status))
                        if state != seen:
                            seen = state
                            if on_change is not None:
                                await on_change(latest)
                        if latest.status.terminal and not await self._session_alive(execution_id):
                            return latest
                except QrsError as exc:
                    logger.warning(
                        "following execution {} of task {}: {}", execution_id, task.id, exc
                    )
                await asyncio.sleep(self._interval)
        finally:
            self.following -= 1
