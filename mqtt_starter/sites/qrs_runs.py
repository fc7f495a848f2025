"""What QRS says about runs: execution results (by execution, or what changed since a moment),
whether a session lives, and a reload's script log.

Where qrs-api.md section 6 leaves an answer open, every answer listed is taken: `scriptlogfile`
as an object or a bare string or missing (the older call then), a log not written yet
(LogNotReady: the caller tries again), a download of any media type and charset (the transport
decodes it), and filter dates read as UTC or as the server's local time (`calibrate_dates`
measures which and corrects for it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

from loguru import logger

from mqtt_starter.core.errors import (
    LogNotReady,
    QrsAuthError,
    QrsRequestError,
    QrsUnavailable,
)
from mqtt_starter.core.model import (
    Execution,
    TaskRef,
)
from mqtt_starter.core.monitoring import iso, log_tail, parse_iso
from mqtt_starter.core.qrs_query import (
    changed_filter,
    execution_filter,
    executions_filters,
    normalize_guid,
    parse_execution,
)
from mqtt_starter.sites.qrs_api import LOG_TAIL_BYTES, QUARTER_HOUR_S, QrsApi


class QrsRuns:
    """Execution results, script logs and the reading of filter dates, through `api`."""

    def __init__(self, api: QrsApi) -> None:
        self.api = api
        # How QRS reads a date in a filter, measured by `calibrate_dates` (seconds to add to a
        # UTC moment so that QRS reads it as that moment; 0 for a server that reads UTC).
        self.date_offset_s = 0.0
        self._date_note = "not measured yet"

    async def executions(self, params: Mapping[str, str]) -> list[Execution]:
        # Only /full carries task, execution, status and details: the plain list is condensed.
        data = await self.api.json("GET", "executionresult/full", params)
        items = data if isinstance(data, list) else []
        return [parse_execution(i) for i in items if isinstance(i, dict)]

    async def execution_results(self, execution_id: str) -> list[Execution]:
        return await self.executions({"filter": execution_filter(execution_id)})

    async def executions_of(self, execution_ids: Sequence[str]) -> list[Execution]:
        """Every attempt of every given execution: one query per chunk of ids."""
        found: list[Execution] = []
        for text in executions_filters(execution_ids):
            found += await self.executions({"filter": text})
        return found

    async def changed_executions(self, since: str) -> list[Execution]:
        return await self.executions({"filter": changed_filter(self._as_read(since))})

    def _as_read(self, moment: str) -> str:
        """`moment` (UTC) written so that QRS reads it as that moment (`calibrate_dates`)."""
        if not self.date_offset_s:
            return moment
        parsed = parse_iso(moment)
        return moment if parsed is None else iso(parsed + timedelta(seconds=self.date_offset_s))

    @property
    def date_note(self) -> str:
        return self._date_note

    async def calibrate_dates(self) -> bool:
        """Learn how QRS reads a date in a filter (qrs-api.md section 6: as UTC, or as the
        server's local time) and correct for it; what was found, in words.

        A known result is asked for by its own `modifiedDate`: a server that reads UTC returns
        it. Else, and to find a server east of UTC (which returns it, and more), the latest
        moment that still returns it is sought among the offsets time zones have (quarter
        hours from -12 h to +14 h): that is the server's offset. False when there was no
        run to measure against (dates are then sent as UTC).
        """
        known = await self._known_result()
        if known is None:
            self._date_note = "no run in the last day to measure against: dates are sent as UTC"
            return False
        moment = parse_iso(known.modified)
        assert moment is not None

        async def returned(offset_s: float) -> bool:
            literal = iso(moment + timedelta(seconds=offset_s))
            found = await self.executions(
                {"filter": f"id eq {known.result_id} and modifiedDate ge '{literal}'"}
            )
            return any(r.result_id == known.result_id for r in found)

        quarters = range(-12 * 4, 14 * 4 + 1)
        if await returned(0) and not await returned(QUARTER_HOUR_S):
            offset = 0.0
        else:
            low, high = 0, len(quarters) - 1  # the last quarter that still returns it
            if not await returned(quarters[low] * QUARTER_HOUR_S):
                self._date_note = "QRS did not return a known run by its own date: sent as UTC"
                logger.warning("QRS date filter: {}", self._date_note)
                return False
            while low < high:
                middle = (low + high + 1) // 2
                if await returned(quarters[middle] * QUARTER_HOUR_S):
                    low = middle
                else:
                    high = middle - 1
            offset = quarters[low] * QUARTER_HOUR_S
        self.date_offset_s = offset
        if offset:
            self._date_note = (
                f"QRS reads filter dates as its local time (UTC{offset / 3600:+g} h): corrected for"
            )
            logger.warning("QRS date filter: {}", self._date_note)
        else:
            self._date_note = "QRS reads filter dates as UTC"
            logger.info("QRS date filter: {}", self._date_note)
        return True

    async def _known_result(self) -> Execution | None:
        """The newest result changed in the last hour, else the last day (read as UTC: a
        server west of UTC returns less, which the wider window makes up for)."""
        now = datetime.now(UTC)
        for back in (timedelta(hours=1), timedelta(days=1)):
            found = [
                r
                for r in await self.executions({"filter": changed_filter(iso(now - back))})
                if r.result_id and parse_iso(r.modified) is not None
            ]
            if found:
                return max(found, key=lambda r: (parse_iso(r.modified), r.result_id))
        return None

    async def script_log_tail(self, task: TaskRef, execution: Execution, lines: int) -> str | None:
        """The last `lines` lines of the attempt's script log; None when it has none (not a
        reload); LogNotReady when QRS has not written it yet (try again later).

        The call of May 2025 first (by result id); a server without it (any 4xx but 401 and
        403, or a 5xx after the retries) gets the older call (by file reference).
        """
        if task.task_type != 0:
            return None  # only reloads write a script log
        download = await self._log_download(
            f"reloadtask/{task.id}/scriptlogfile", {"executionResultId": execution.result_id}
        )
        if download is None and execution.file_reference_id:
            download = await self._log_download(
                f"reloadtask/{task.id}/scriptlog", {"fileReferenceId": execution.file_reference_id}
            )
        if download is None:
            raise LogNotReady(f"QRS has no script log for result {execution.result_id} yet")
        file_name = re.sub(r"[^0-9A-Za-z_-]+", "_", task.name)[:100] or "script"
        try:
            _, text = await self.api.call(
                "GET", f"download/reloadtask/{download}/{file_name}.log", tail_bytes=LOG_TAIL_BYTES
            )
        except QrsRequestError as exc:
            if exc.status == 404:
                raise LogNotReady(f"the script log download answered 404: {exc}") from None
            raise
        tail = log_tail(text, lines)
        if not tail:
            raise LogNotReady(f"the script log of result {execution.result_id} is empty so far")
        return tail

    async def _log_download(self, path: str, params: Mapping[str, str]) -> str | None:
        """The download id a log call gives (`{"value": id}` or a bare JSON string); None when
        this call cannot give it (a server without the call, or no log under that key)."""
        try:
            data = await self.api.json("GET", path, params)
        except QrsAuthError:
            raise
        except (QrsRequestError, QrsUnavailable) as exc:
            logger.debug("QRS {}: {}; trying the other script log call", path, exc)
            return None
        value = data.get("value") if isinstance(data, dict) else data
        return normalize_guid(value) if isinstance(value, str) else None

    async def execution_alive(self, execution_id: str) -> bool:
        """Whether the execution session still exists (QRS deletes it at the end)."""
        guid = normalize_guid(execution_id)
        if guid is None:
            raise ValueError(f"not a GUID: {execution_id!r}")
        try:
            await self.api.call("GET", f"executionsession/{guid}")
        except QrsRequestError as exc:
            if exc.status == 404:
                return False
            raise
        return True
