"""The QRS client: the only module that imports the HTTP client library.

One aiohttp session and connection pool; every call gets a fresh xrfkey (query and header),
the X-Qlik-User header, and either the client certificate (port 4242) or a bearer JWT (virtual
proxy). At most `max_concurrency` calls are in flight. Connection errors, timeouts and 5xx are
retried with full-jitter exponential backoff; 4xx never are. aiohttp and ssl errors become
QrsError subclasses here and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote as url_quote

import aiohttp
from yarl import URL

from .config import QrsSettings
from .errors import QrsAuthError, QrsRequestError, QrsUnavailable
from .model import Execution, Resolution, Selector, SelectorKind, TaskRef
from .qrs_query import (
    EMPTY_GUID,
    execution_filter,
    normalize_guid,
    parse_execution,
    parse_task,
    task_filters,
)
from .resolution import dedupe_selectors, queryable, resolve

# Called after each QRS call with (operation, seconds, HTTP status or 0 when none came back).
Observer = Callable[[str, float, int], None]


def new_xrfkey() -> str:
    # 16 characters of 0-9a-f (within QRS's 0-9a-zA-Z) from one urandom call: drawing each
    # character with secrets.choice cost 4% of the daemon's time under load.
    return secrets.token_hex(8)


def build_ssl_context(settings: QrsSettings) -> ssl.SSLContext:
    """Blocking (reads key files): call once, off the event loop."""
    context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    if settings.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.auth == "certificate":
        context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


class _Retryable(Exception):
    def __init__(self, message: str, status: int = 0) -> None:
        self.status = status
        super().__init__(message)


class QrsClient:
    """`await client.start()` once, then the operations; `await client.close()` at the end."""

    def __init__(
        self,
        settings: QrsSettings,
        *,
        observer: Observer | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._observer = observer
        self._rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._gate = asyncio.Semaphore(settings.max_concurrency)
        self.last_success: float | None = None  # monotonic time of the last answered call

    async def start(self) -> None:
        try:
            context = await asyncio.to_thread(build_ssl_context, self.settings)
        except (OSError, ssl.SSLError) as exc:
            raise QrsAuthError(f"a QRS certificate or key is unreadable: {exc}") from None
        connector = aiohttp.TCPConnector(ssl=context, limit=self.settings.max_concurrency)
        headers = {
            "X-Qlik-User": f"UserDirectory={self.settings.user_directory}; "
            f"UserId={self.settings.user_id}",
            "Accept": "application/json",
        }
        if self.settings.auth == "jwt" and self.settings.jwt is not None:
            headers["Authorization"] = f"Bearer {self.settings.jwt.get_secret_value()}"
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=headers,
            raise_for_status=False,
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> QrsClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- transport ---------------------------------------------------------------------------

    def _url(self, path: str, params: Mapping[str, str], xrfkey: str) -> URL:
        query = "&".join(
            f"{k}={url_quote(v, safe='')}" for k, v in {**params, "xrfkey": xrfkey}.items()
        )
        return URL(f"{self.settings.url}/qrs/{path}?{query}", encoded=True)

    async def _once(
        self, method: str, path: str, params: Mapping[str, str], body: Any
    ) -> tuple[int, str]:
        if self._session is None:
            raise RuntimeError("QrsClient.start() was not called")
        xrfkey = new_xrfkey()
        try:
            async with (
                self._gate,
                self._session.request(
                    method,
                    self._url(path, params, xrfkey),
                    json=body,
                    headers={"X-Qlik-Xrfkey": xrfkey},
                ) as response,
            ):
                return response.status, await response.text()
        except aiohttp.ClientConnectorCertificateError as exc:
            raise QrsAuthError(
                f"TLS verification of {self.settings.url} failed: {exc.certificate_error}",
                path=path,
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise QrsAuthError(
                f"TLS handshake with {self.settings.url} failed: {exc}", path=path
            ) from None
        except aiohttp.ServerDisconnectedError as exc:
            hint = (
                " (a server that refuses the client certificate disconnects like this)"
                if self.settings.auth == "certificate"
                else ""
            )
            raise _Retryable(f"{type(exc).__name__}: {exc}{hint}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None

    async def call(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> tuple[int, str]:
        """(status, text) of a 2xx answer, after retries; raises a QrsError otherwise."""
        params = params or {}
        retry = self.settings.retry
        operation = f"{method} {path.split('/')[0]}"
        for attempt in range(1, retry.attempts + 1):
            started = time.monotonic()
            status = 0
            try:
                status, text = await self._once(method, path, params, body)
                if status >= 500:
                    raise _Retryable(f"HTTP {status}: {text[:200]}", status)
            except _Retryable as exc:
                if attempt == retry.attempts:
                    raise QrsUnavailable(
                        f"QRS {method} /qrs/{path} failed after {attempt} attempt(s): {exc}",
                        status=exc.status or None,
                        path=path,
                    ) from None
                ceiling = min(retry.max_backoff_s, retry.backoff_s * 2 ** (attempt - 1))
                await asyncio.sleep(self._rng.uniform(0, ceiling))
                continue
            finally:
                if self._observer is not None:
                    self._observer(operation, time.monotonic() - started, status)
            self.last_success = time.monotonic()
            if status in (401, 403):
                raise QrsAuthError(
                    f"QRS refused {method} /qrs/{path}: HTTP {status} {text[:200]}",
                    status=status,
                    path=path,
                )
            if status >= 400:
                raise QrsRequestError(
                    f"QRS answered {method} /qrs/{path} with HTTP {status}: {text[:200]}",
                    status=status,
                    path=path,
                )
            return status, text
        raise AssertionError("unreachable: retry.attempts >= 1")

    async def _json(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> Any:
        status, text = await self.call(method, path, params, body)
        try:
            return json.loads(text) if text else None
        except json.JSONDecodeError:
            raise QrsRequestError(
                f"QRS answered /qrs/{path} with invalid JSON", status=status, path=path
            ) from None

    # -- operations --------------------------------------------------------------------------

    async def about(self) -> dict[str, Any]:
        data = await self._json("GET", "about")
        return data if isinstance(data, dict) else {}

    async def find_tasks(self, selectors: Sequence[Selector]) -> list[TaskRef]:
        """Candidate tasks for `selectors`: one query per chunk of selectors, not per task."""
        found: dict[str, TaskRef] = {}
        for text in task_filters(selectors):
            data = await self._json("GET", "task/full", {"filter": text})
            for task in self._tasks(data):
                found.setdefault(task.id, task)
        return list(found.values())

    @staticmethod
    def _tasks(data: Any) -> list[TaskRef]:
        """Tasks from a QRS list answer; anything that is not a task with a GUID is passed over."""
        items = data if isinstance(data, list) else []
        return [t for t in (parse_task(i) for i in items if isinstance(i, dict)) if t is not None]

    async def resolve(
        self, selectors: Sequence[Selector], *, all_task_ids_must_exist: bool = False
    ) -> Resolution:
        selectors = dedupe_selectors(selectors)
        wanted = queryable(selectors)
        candidates = await self.find_tasks(wanted) if wanted else []
        return resolve(selectors, candidates, all_task_ids_must_exist=all_task_ids_must_exist)

    async def all_tasks(self) -> list[TaskRef]:
        return self._tasks(await self._json("GET", "task/full"))

    async def task(self, task_id: str) -> TaskRef | None:
        """The task's current state (tags, enabled, last execution), None when it is unknown."""
        tasks = await self.find_tasks([Selector(SelectorKind.ID, task_id)])
        return tasks[0] if tasks else None

    async def start_task(self, task_id: str) -> str | None:
        """Start a task; its execution session id, or None when QRS did not start it."""
        guid = normalize_guid(task_id)
        if guid is None:
            raise ValueError(f"not a GUID: {task_id!r}")
        data = await self._json("POST", f"task/{guid}/start/synchronous")
        value = data.get("value") if isinstance(data, dict) else None
        session = normalize_guid(value) if isinstance(value, str) else None
        return None if session in (None, EMPTY_GUID) else session

    async def execution_results(self, execution_id: str) -> list[Execution]:
        data = await self._json(
            "GET", "executionresult", {"filter": execution_filter(execution_id)}
        )
        return (
            [parse_execution(i) for i in data if isinstance(i, dict)]
            if isinstance(data, list)
            else []
        )
