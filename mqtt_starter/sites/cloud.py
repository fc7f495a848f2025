"""The Qlik Cloud backend: the same `Backend` as QRS, on a tenant's REST API (qlik-cloud-api.md).

A "task" is an app: its id is the app id, a run is a reload. Selectors: `id`, `tag` (a public
collection), `name` (exact, compared here: the API matches loosely) and `space`; custom
properties have no Cloud equivalent (`unsupported`).

Calls are retried with jittered backoff on connection errors, timeouts and 5xx, except a
reload start, which is re-sent only when the connection was refused; when its answer is lost
the app's reloads are read and one created since is reported `started`, else `unknown`. A 429
rate limit (`HTTP-429`) is waited out for its `Retry-After` and the call repeated; the tenant
did not carry it out. Starts pass one at a time, in order (a FIFO lock), paced to
`max_starts_per_minute`: a start that must wait is never dropped, and says how long it waited.

Auth: an API key, or an OAuth client (client credentials) whose token is fetched again before
it expires and, on a 401, once at once. HTTPS_PROXY / NO_PROXY are honoured; `ca_file` adds a
private CA (a TLS-inspecting proxy).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from loguru import logger
from yarl import URL

from mqtt_starter.config import CloudSettings
from mqtt_starter.core.errors import (
    LogNotReady,
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
from mqtt_starter.core.monitoring import log_tail
from mqtt_starter.core.pacing import StartPacer
from mqtt_starter.sites.base import LOG_RETRY_S, contained_log_tail
from mqtt_starter.sites.http import Answer, Observer, Prepared, SharedToken, TlsFiles, Transport

# Qlik Cloud's reload states and their QRS counterparts (DESIGN.md section 8).
STATES = {
    "QUEUED": TaskStatus.QUEUED,
    "RELOADING": TaskStatus.STARTED,
    "CANCELING": TaskStatus.ABORT_INITIATED,
    "SUCCEEDED": TaskStatus.FINISHED_SUCCESS,
    "FAILED": TaskStatus.FINISHED_FAIL,
    "CANCELED": TaskStatus.ABORTED,
    "EXCEEDED_LIMIT": TaskStatus.ERROR,
}
PAGE = 100  # the API's largest page
MAX_PAGES = 100
TOKEN_MARGIN_S = 60.0  # a token is fetched again this long before it expires
LOG_TAIL_BYTES = 256 * 1024
KEPT = 10_000  # reloads whose last state and reason are remembered
# A reload created this long before the start call (clock skew) still counts as ours.
CREATION_SKEW_S = 2.0
RATE_LIMIT_CODE = "HTTP-429"


def _errors(data: Any) -> tuple[str, str]:
    """(code, "title: detail") of Qlik's error body."""
    errors = data.get("errors") if isinstance(data, dict) else None
    first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
    code = str(first.get("code", ""))
    text = ": ".join(str(first[k]) for k in ("title", "detail") if first.get(k))
    return code, text


def rate_limit_wait(answer: Answer) -> float | None:
    """How long a 429 asks to wait, when it is a rate limit: Qlik's `HTTP-429` or a
    `Retry-After` (qlik-cloud-api.md). A pending-reload 429, or one from a proxy with an HTML
    page, is not one (None)."""
    if answer.status != 429:
        return None
    code, _ = _errors(answer.json())
    header = answer.headers.get("Retry-After")
    if code != RATE_LIMIT_CODE and header is None:
        return None
    try:
        return max(0.0, float(header)) if header is not None else 1.0
    except ValueError:
        return 1.0


def _item_tags(item: Mapping[str, Any]) -> set[str]:
    """The tags an item carries (`meta.tags`): no query per tag is needed to know them."""
    meta = item.get("meta")
    found = meta.get("tags") if isinstance(meta, Mapping) else None
    return {
        str(t["name"])
        for t in found or ()
        if isinstance(t, Mapping) and isinstance(t.get("name"), str)
    }


def _time(text: Any) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


class CloudClient:
    """The Qlik Cloud operations over the shared transport (transport.py)."""

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
        self._tail_lines = log_tail_lines
        self._clock = clock
        self._log_retry_s = tuple(log_retry_s)
        self._lane = asyncio.Lock()  # starts, one at a time and in order
        self._pacer = StartPacer(settings.max_starts_per_minute, rate_window_s)
        self._throttled = 0.0  # seconds starts have waited for the rate limit, in all
        self._spaces: dict[str, str] = {}  # space id → name
        self._collections: dict[str, list[str]] = {}  # tag → collection ids
        self._states: OrderedDict[str, TaskStatus] = OrderedDict()
        self._reasons: OrderedDict[str, str] = OrderedDict()
        self.token = (
            SharedToken(self._fetch_token, clock=clock, margin_s=TOKEN_MARGIN_S)
            if settings.auth == "oauth"
            else None
        )
        self.transport = Transport(
            "Qlik Cloud",
            settings.tenant_url,
            TlsFiles(ca_file=settings.ca_file, ca_key="cloud.ca_file"),
            timeout_s=settings.timeout_s,
            max_concurrency=settings.max_concurrency,
            retry=settings.retry,
            trust_env=True,  # HTTPS_PROXY, NO_PROXY
            observer=observer,
            rng=rng,
            clock=clock,
            token=self.token,
            rate_limit=rate_limit_wait,
            certificate_hint=lambda _: "behind a TLS-inspecting proxy, set cloud.ca_file to its CA",
        )
        self.transport.on_rate_limit = self._rate_limited

    @property
    def last_success(self) -> float | None:
        """Monotonic time of the last call the tenant answered."""
        return self.transport.last_success

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the TLS set-up (ConfigError naming cloud.ca_file when it cannot be used)."""
        await self.transport.start()

    async def close(self) -> None:
        await self.transport.close()

    # -- HTTP --------------------------------------------------------------------------------------

    def _rate_limited(self, wait: float) -> None:
        self._pacer.blocked(self._clock(), wait)
        self._throttled += wait

    async def _fetch_token(self) -> tuple[str, float]:
        s = self.settings
        assert s.client_id is not None and s.client_secret is not None
        body = {
            "client_id": s.client_id,
            "client_secret": s.client_secret.get_secret_value(),
            "scope": s.scope,
            "grant_type": "client_credentials",
        }
        answer = await self.transport.send(
            "POST",
            Prepared(f"{s.tenant_url}/oauth/token", {}),
            path="oauth/token",
            body=body,
        )
        data = answer.json()
        if answer.status >= 500:
            raise QrsUnavailable(f"Qlik Cloud OAuth token endpoint: HTTP {answer.status}")
        token = data.get("access_token") if isinstance(data, dict) else None
        lifetime = data.get("expires_in") if isinstance(data, dict) else None
        if answer.status != 200 or not isinstance(token, str):
            code, text = _errors(data)
            raise QrsAuthError(
                f"Qlik Cloud refused the OAuth client {s.client_id!r}: HTTP {answer.status}"
                f" {code} {text}".rstrip()
                + "; check cloud.client_id, cloud.client_secret and cloud.scope",
                status=answer.status,
            )
        logger.debug("Qlik Cloud OAuth token fetched for client {}", s.client_id)
        return token, float(lifetime) if isinstance(lifetime, int | float) else 3600.0

    def _bearer(self) -> Mapping[str, str]:
        s = self.settings
        if s.auth == "api_key":
            assert s.api_key is not None
            return {"Authorization": f"Bearer {s.api_key.get_secret_value()}"}
        return {}  # the shared token is added by the transport

    async def _call(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        *,
        repeatable: bool = True,
        tail_bytes: int = 0,
    ) -> tuple[int, Any]:
        """(status, data) of an answer below 500, after retries, rate-limit waits and one token
        renewal; 401 raises QrsAuthError."""
        url = f"{self.settings.tenant_url}/{path}"
        answer = await self.transport.call(
            method,
            lambda: Prepared(url, self._bearer(), params),
            path=path,
            operation=f"{method} {path.split('/')[2] if path.count('/') >= 2 else path}",
            body=body,
            repeatable=repeatable,
            tail_bytes=tail_bytes,
        )
        data: Any = answer.text if tail_bytes and answer.status < 300 else answer.json()
        if answer.status == 401:
            _, text = _errors(data)
            raise QrsAuthError(
                f"Qlik Cloud refused {method} /{path}: HTTP 401 {text}; check"
                f" cloud.{'api_key' if self.settings.auth == 'api_key' else 'client_id'}",
                status=401,
                path=path,
                detail=text,
            )
        return answer.status, data

    async def _json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        status, data = await self._call("GET", path, params)
        if status >= 400:
            code, text = _errors(data)
            error = QrsAuthError if status == 403 else QrsRequestError
            raise error(
                f"Qlik Cloud answered GET /{path} with HTTP {status}: {code} {text}".rstrip(),
                status=status,
                path=path,
                detail=f"{code} {text}".strip(),
            )
        return data

    async def _list(self, path: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        """Every item of a paged list (`links.next.href`)."""
        found: list[dict[str, Any]] = []
        query: dict[str, str] = {**params, "limit": str(PAGE)}
        for _ in range(MAX_PAGES):
            data = await self._json(path, query)
            page = data.get("data") if isinstance(data, dict) else None
            found += [i for i in page or [] if isinstance(i, dict)]
            href = (
                data.get("links", {}).get("next", {}).get("href")
                if isinstance(data, dict)
                else None
            )
            if not isinstance(href, str) or not href:
                return found
            query = dict(URL(href).query)
        logger.warning("Qlik Cloud /{}: more than {} pages; the rest is left", path, MAX_PAGES)
        return found

    # -- finding apps ---------------------------------------------------------------------------

    async def about(self) -> dict[str, Any]:
        await self._json("api/v1/items", {"resourceType": "app", "limit": "1"})
        return {"buildVersion": "Qlik Cloud", "tenant": self.settings.tenant_url}

    async def task_count(self) -> int | None:
        return len(await self._list("api/v1/items", {"resourceType": "app"}))

    async def _collection_ids(self, tag: str) -> list[str]:
        if tag not in self._collections:
            found = await self._list("api/v1/collections", {"type": "public", "name": tag})
            self._collections[tag] = [
                str(c["id"]) for c in found if c.get("name") == tag and c.get("id")
            ]
        return self._collections[tag]

    async def _space_name(self, space_id: str) -> str:
        if space_id and space_id not in self._spaces:
            for space in await self._list("api/v1/spaces", {}):
                self._spaces[str(space.get("id"))] = str(space.get("name", ""))
            self._spaces.setdefault(space_id, "")
        return self._spaces.get(space_id, "")

    async def find_tasks(self, selectors: Sequence[Selector]) -> list[TaskRef]:
        items: dict[str, dict[str, Any]] = {}
        tags: dict[str, set[str]] = {}

        def take(found: list[dict[str, Any]], tag: str | None = None) -> None:
            for item in found:
                app_id = str(item.get("resourceId", "")).lower()
                if app_id:
                    items.setdefault(app_id, item)
                    if tag is not None:
                        tags.setdefault(app_id, set()).add(tag)

        ids = [s.value for s in selectors if s.kind is SelectorKind.ID]
        for i in range(0, len(ids), PAGE):
            take(
                await self._list(
                    "api/v1/items",
                    {"resourceType": "app", "resourceIds": ",".join(ids[i : i + PAGE])},
                )
            )
        for s in selectors:
            if s.kind is SelectorKind.TAG:
                for collection in await self._collection_ids(s.value):
                    found = await self._list(
                        "api/v1/items", {"resourceType": "app", "collectionId": collection}
                    )
                    take(found, s.value)
            elif s.kind is SelectorKind.NAME:
                found = await self._list("api/v1/items", {"resourceType": "app", "name": s.value})
                take([i for i in found if str(i.get("name", "")).casefold() == s.value.casefold()])
            elif s.kind is SelectorKind.SPACE:
                spaces = await self._list("api/v1/spaces", {"name": s.value})
                for space in spaces:
                    if str(space.get("name", "")).casefold() == s.value.casefold():
                        self._spaces[str(space["id"])] = str(space["name"])
                        found = await self._list(
                            "api/v1/items", {"resourceType": "app", "spaceId": str(space["id"])}
                        )
                        take(found)
        return list(
            await asyncio.gather(
                *(self._task(item, tags.get(app_id, set())) for app_id, item in items.items())
            )
        )

    async def _task(
        self, item: Mapping[str, Any], tags: set[str], *, with_state: bool = True
    ) -> TaskRef:
        """The app as a task. `with_state`: its newest reload gives `last_status`, so that the
        policy sees a reloading app as running (`policy.on_running`), as on QRS."""
        app_id = str(item.get("resourceId", "")).lower()
        name = str(item.get("name", ""))
        tags = tags | _item_tags(item)
        status, reload_id = TaskStatus.NEVER_STARTED, ""
        if with_state:
            data = await self._json("api/v1/reloads", {"appId": app_id, "limit": "1"})
            newest = data.get("data") if isinstance(data, dict) else None
            if newest and isinstance(newest[0], dict):
                status = STATES.get(str(newest[0].get("status")), TaskStatus.NEVER_STARTED)
                reload_id = str(newest[0].get("id", ""))
        return TaskRef(
            id=app_id,
            name=name,
            tags=tuple(sorted(tags)),
            last_status=status,
            app_id=app_id,
            app_name=name,
            space=await self._space_name(str(item.get("spaceId") or "")),
            last_result_id=reload_id,
        )

    async def all_tasks(self) -> list[TaskRef]:
        """Every app, without its state (one call per app would be too many here)."""
        found = await self._list("api/v1/items", {"resourceType": "app"})
        return [await self._task(i, set(), with_state=False) for i in found]

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
        queued_at, throttled = self._clock(), self._throttled
        async with self._lane:
            delay = self._pacer.delay(self._clock())
            if delay > 0:
                self._throttled += delay
                await asyncio.sleep(delay)
            sent_at = time.time()
            waited = self._clock() - queued_at if self._throttled > throttled else 0.0
            try:
                status, data = await self._call(
                    "POST", "api/v1/reloads", body=body, repeatable=False
                )
            except QrsAnswerLost as exc:
                self._pacer.started(self._clock())
                return await self._after_lost_start(task, sent_at, str(exc))
            except (QrsUnavailable, QrsAuthError) as exc:
                return StartResult(TaskResult.FAILED, error=str(exc))
            if self._throttled > throttled:
                waited = self._clock() - queued_at  # a 429 was waited out too
            self._pacer.started(self._clock())
        waited_ms = round(waited * 1000)
        if status == 201 and isinstance(data, dict) and isinstance(data.get("id"), str):
            self._remember(
                self._states, data["id"], STATES.get(str(data.get("status")), TaskStatus.QUEUED)
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
            data = await self._json("api/v1/reloads", {"appId": task.id, "limit": "5"})
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

    # -- following ---------------------------------------------------------------------------------

    @staticmethod
    def _remember(cache: OrderedDict[str, Any], key: str, value: Any) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > KEPT:
            cache.popitem(last=False)

    async def execution_results(self, execution_id: str) -> list[Execution]:
        try:
            data = await self._json(f"api/v1/reloads/{execution_id}")
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
        status, text = await self._call("GET", path, tail_bytes=LOG_TAIL_BYTES)
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

    date_note = "Qlik Cloud: no date filters are used"

    async def calibrate_dates(self) -> bool:
        return True

    async def changed_executions(self, since: str) -> list[Execution]:
        raise QrsRequestError("watching every run is not available for Qlik Cloud")

    async def script_log_tail(self, task: TaskRef, execution: Execution, lines: int) -> str | None:
        return await self._log_tail(task.id, execution.execution_id, lines)
