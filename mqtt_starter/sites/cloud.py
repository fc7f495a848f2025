"""The Qlik Cloud backend: the same `Backend` as QRS, on a tenant's REST API (qlik-cloud-api.md).

A "task" is an app: its id is the app id, a run is a reload. Finding apps is cloud_apps.py's,
following reloads cloud_reloads.py's, the tenant's calls (bearer, rate limit, errors, paging)
cloud_api.py's. Here: starting reloads. Starts pass one at a time, in order (a FIFO lock), paced
to `max_starts_per_minute`: a start that must wait is never dropped, and says how long it
waited. A start is re-sent only when the connection was refused; when its answer is lost the
app's reloads are read, and one the API started since is reported `started`, else `unknown`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from loguru import logger

from mqtt_starter.config import CloudSettings
from mqtt_starter.core.errors import (
    QrsAnswerLost,
    QrsAuthError,
    QrsRequestError,
    QrsUnavailable,
)
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
from mqtt_starter.sites.base import LOG_RETRY_S
from mqtt_starter.sites.cloud_api import (
    CREATION_SKEW_S,
    RATE_LIMIT_CODE,
    STATES,
    CloudApi,
    _errors,
    _time,
)
from mqtt_starter.sites.cloud_apps import CloudApps
from mqtt_starter.sites.cloud_reloads import CloudReloads
from mqtt_starter.sites.http import Observer, SharedToken


class CloudClient:
    """The Backend for a Qlik Cloud tenant: finding apps and starting reloads here; following
    them in cloud_reloads.py; the tenant's calls in cloud_api.py."""

    site = "cloud"
    unsupported = frozenset({SelectorKind.CUSTOM_PROPERTY})

    def __init__(
        self,
        settings: CloudSettings,
        *,
        log_tail_lines: int = 30,
        observer: Observer | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        rate_window_s: float = 60.0,
        log_retry_s: Sequence[float] = LOG_RETRY_S,
    ) -> None:
        """`rate_window_s`: the window of max_starts_per_minute (a minute; tests shorten it).
        `log_retry_s`: the waits before each new read of a log that is not there yet."""
        self.settings = settings
        self._clock = clock
        self.api = CloudApi(
            settings, observer=observer, rng=rng, clock=clock, rate_window_s=rate_window_s
        )
        self.reloads = CloudReloads(self.api, log_tail_lines, log_retry_s)
        self._lane = asyncio.Lock()  # starts, one at a time and in order
        self.apps = CloudApps(self.api)

    @property
    def last_success(self) -> float | None:
        """Monotonic time of the last call the tenant answered."""
        return self.api.last_success

    async def start(self) -> None:
        """Load the TLS set-up (ConfigError naming cloud.ca_file when it cannot be used)."""
        await self.api.start()

    async def close(self) -> None:
        await self.api.close()

    @property
    def token(self) -> SharedToken | None:
        return self.api.token

    # -- finding apps ---------------------------------------------------------------------------

    async def about(self) -> dict[str, Any]:
        await self.api.json("api/v1/items", {"resourceType": "app", "limit": "1"})
        return {"buildVersion": "Qlik Cloud", "tenant": self.settings.tenant_url}

    async def task_count(self) -> int | None:
        return len(await self.api.list("api/v1/items", {"resourceType": "app"}))

    async def find_tasks(self, selectors: Sequence[Selector]) -> list[TaskRef]:
        return await self.apps.find_tasks(selectors)

    async def all_tasks(self) -> list[TaskRef]:
        return await self.apps.all_tasks()

    async def task(self, task_id: str) -> TaskRef | None:
        found = await self.find_tasks([Selector(SelectorKind.ID, task_id)])
        return found[0] if found else None

    # -- starting ---------------------------------------------------------------------------------

    async def start_task(self, task: TaskRef, options: ReloadOptions | None = None) -> StartResult:
        body: dict[str, Any] = {"appId": task.id}
        if options is not None:
            if options.partial is not None:
                body["partial"] = options.partial
            if options.weight is not None:
                body["weight"] = options.weight
            if options.variables is not None:
                body["variables"] = dict(options.variables)
        queued_at, throttled = self._clock(), self.api.throttled
        async with self._lane:
            delay = self.api.pacer.delay(self._clock())
            if delay > 0:
                self.api.throttled += delay
                await asyncio.sleep(delay)
            sent_at = time.time()
            waited = self._clock() - queued_at if self.api.throttled > throttled else 0.0
            try:
                status, data = await self.api.call(
                    "POST", "api/v1/reloads", body=body, repeatable=False
                )
            except QrsAnswerLost as exc:
                self.api.pacer.started(self._clock())
                return await self._after_lost_start(task, sent_at, str(exc))
            except (QrsUnavailable, QrsAuthError) as exc:
                return StartResult(TaskResult.FAILED, error=str(exc))
            if self.api.throttled > throttled:
                waited = self._clock() - queued_at  # a 429 was waited out too
            self.api.pacer.started(self._clock())
        waited_ms = round(waited * 1000)
        if status == 201 and isinstance(data, dict) and isinstance(data.get("id"), str):
            self.reloads.remember_state(
                data["id"], STATES.get(str(data.get("status")), TaskStatus.QUEUED)
            )
            return StartResult(TaskResult.STARTED, execution_id=data["id"], waited_ms=waited_ms)
        code, text = _errors(data)
        if status == 429 and code == RATE_LIMIT_CODE:
            return StartResult(
                TaskResult.FAILED,
                error=f"Qlik Cloud's rate limit held the reload back past"
                f" cloud.retry.max_backoff_s ({self.settings.retry.max_backoff_s:g} s): {text}",
                waited_ms=waited_ms,
            )
        if status == 429 and code:
            # Qlik keeps one queued reload per app: "a pending reload request already exists".
            return StartResult(TaskResult.ALREADY_RUNNING, error=text or None, waited_ms=waited_ms)
        if status == 429:
            text = (
                f"a 429 that is neither Qlik's rate limit nor a pending reload: {str(data)[:200]}"
            )
        return StartResult(
            TaskResult.FAILED,
            error=f"Qlik Cloud refused the reload: HTTP {status} {code} {text}".rstrip(),
            waited_ms=waited_ms,
        )

    async def _after_lost_start(self, task: TaskRef, sent_at: float, why: str) -> StartResult:
        """The answer to a reload start was lost: a reload of the app created since through
        the API (`type: external`) is ours; one a user, a schedule or an automation started
        is not."""
        try:
            data = await self.api.json("api/v1/reloads", {"appId": task.id, "limit": "5"})
        except (QrsUnavailable, QrsAuthError, QrsRequestError) as exc:
            return StartResult(TaskResult.UNKNOWN, error=f"{why}; the app's reloads: {exc}")
        for reload in data.get("data", []) if isinstance(data, dict) else []:
            created = _time(reload.get("creationTime"))
            if reload.get("type") != "external":
                continue
            if created is not None and created.timestamp() >= sent_at - CREATION_SKEW_S:
                logger.warning(
                    "the answer to starting app {} was lost ({}); reload {} was created since",
                    task.id,
                    why,
                    reload.get("id"),
                )
                return StartResult(TaskResult.STARTED, execution_id=str(reload["id"]))
        return StartResult(
            TaskResult.UNKNOWN,
            error=f"{why}; no reload of the app was created since: it may or may not run",
        )

    # -- following (cloud_reloads.py) ---------------------------------------------------------

    date_note = "Qlik Cloud: no date filters are used"

    async def calibrate_dates(self) -> bool:
        return True

    async def execution_results(self, execution_id: str) -> list[Execution]:
        return await self.reloads.execution_results(execution_id)

    async def execution_alive(self, execution_id: str) -> bool:
        return await self.reloads.execution_alive(execution_id)

    async def executions_of(self, execution_ids: Sequence[str]) -> list[Execution]:
        return await self.reloads.executions_of(execution_ids)

    async def changed_executions(self, since: str) -> list[Execution]:
        raise QrsRequestError("watching every run is not available for Qlik Cloud")

    async def script_log_tail(self, task: TaskRef, execution: Execution, lines: int) -> str | None:
        return await self.reloads.script_log_tail(task, execution, lines)
