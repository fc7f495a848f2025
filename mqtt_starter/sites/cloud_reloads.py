"""Following Qlik Cloud reloads: their state (Qlik's names, with the QRS state codes), and a
failed reload's reason: Qlik's error, then the tail of the reload log, asked for again while it
answers 404 just after the end.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from mqtt_starter.core.errors import (
    LogNotReady,
    QrsRequestError,
)
from mqtt_starter.core.model import (
    Execution,
    TaskRef,
    TaskStatus,
)
from mqtt_starter.core.monitoring import log_tail
from mqtt_starter.sites.base import contained_log_tail
from mqtt_starter.sites.cloud_api import (
    KEPT,
    LOG_TAIL_BYTES,
    STATES,
    CloudApi,
    _errors,
    _time,
)


class CloudReloads:
    """The reloads' states and reasons, remembered for the reloads followed."""

    def __init__(self, api: CloudApi, tail_lines: int, log_retry_s: Sequence[float]) -> None:
        self.api = api
        self._tail_lines = tail_lines
        self._log_retry_s = tuple(log_retry_s)
        self._states: OrderedDict[str, TaskStatus] = OrderedDict()
        self._reasons: OrderedDict[str, str] = OrderedDict()

    def remember_state(self, reload_id: str, status: TaskStatus) -> None:
        """A reload's state as its start answered (so that `execution_alive` need not ask)."""
        self._remember(self._states, reload_id, status)

    @staticmethod
    def _remember(cache: OrderedDict[str, Any], key: str, value: Any) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > KEPT:
            cache.popitem(last=False)

    async def execution_results(self, execution_id: str) -> list[Execution]:
        try:
            data = await self.api.json(f"api/v1/reloads/{execution_id}")
        except QrsRequestError as exc:
            if exc.status == 404:
                return []
            raise
        if not isinstance(data, dict):
            return []
        state = str(data.get("status", ""))
        status = STATES.get(state, TaskStatus.NEVER_STARTED)
        self._remember(self._states, execution_id, status)
        start, end = _time(data.get("startTime")), _time(data.get("endTime"))
        reason = ""
        if status in (TaskStatus.FINISHED_FAIL, TaskStatus.ERROR):
            reason = await self._reason(execution_id, data)
        message = str(data.get("errorMessage") or data.get("log") or "")
        return [
            Execution(
                execution_id=execution_id,
                task_id=str(data.get("appId", "")).lower(),
                status=status,
                start_time=data.get("startTime") or None,
                stop_time=data.get("endTime") or None,
                duration_ms=round((end - start).total_seconds() * 1000) if start and end else 0,
                message=message,
                reason=reason,
                result_id=execution_id,
                app_id=str(data.get("appId", "")).lower(),
                state=state,
            )
        ]

    async def _reason(self, reload_id: str, data: Mapping[str, Any]) -> str:
        """Qlik's error, then the tail of the reload's log (read once per reload)."""
        if reload_id in self._reasons:
            return self._reasons[reload_id]
        error = ": ".join(str(data[k]) for k in ("errorCode", "errorMessage") if data.get(k))
        app_id = str(data.get("appId", ""))
        tail = await contained_log_tail(
            lambda: self._log_tail(app_id, reload_id, self._tail_lines),
            self._log_retry_s,
            f"reload {reload_id} of app {app_id}",
        )
        reason = "\n".join(part for part in (error, tail) if part)
        self._remember(self._reasons, reload_id, reason)
        return reason

    async def _log_tail(self, app_id: str, reload_id: str, lines: int) -> str | None:
        """The log's last `lines` lines; LogNotReady while it answers 404 (just after the end)."""
        if lines <= 0:
            return None
        path = f"api/v1/apps/{app_id}/reloads/logs/{reload_id}"
        status, text = await self.api.call("GET", path, tail_bytes=LOG_TAIL_BYTES)
        if status == 404:
            raise LogNotReady(f"the log of reload {reload_id} is not there yet (HTTP 404)")
        if status >= 400 or not isinstance(text, str):
            code, detail = _errors(text)
            raise QrsRequestError(
                f"Qlik Cloud answered GET /{path} with HTTP {status}: {code} {detail}".rstrip(),
                status=status,
                path=path,
            )
        return log_tail(text, lines)

    async def execution_alive(self, execution_id: str) -> bool:
        status = self._states.get(execution_id)
        if status is None:
            results = await self.execution_results(execution_id)
            status = results[0].status if results else None
        return status is not None and not status.terminal

    async def executions_of(self, execution_ids: Sequence[str]) -> list[Execution]:
        """One read per reload (the API has no batch read); the connector bounds concurrency."""
        answers = await asyncio.gather(*(self.execution_results(i) for i in execution_ids))
        return [e for results in answers for e in results]

    async def script_log_tail(self, task: TaskRef, execution: Execution, lines: int) -> str | None:
        return await self._log_tail(task.id, execution.execution_id, lines)
