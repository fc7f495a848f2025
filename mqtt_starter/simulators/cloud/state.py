"""The simulated tenant: spaces, public collections (tags), app items, reloads and their logs,
OAuth tokens, the reload rate limit and quota, the journal and faults.

Rules from qlik-cloud-api.md: one queued reload per app (a POST while the app has a reload
QUEUED answers 429 "pending reload"; one asked for while another RELOADS is queued, and
reloads once that one ended); at most `reload_limit` reload POSTs per
`reload_window_s` (more answer 429 HTTP-429 with Retry-After); a refused reload answers 403 with
a RELOADS code; a reload goes QUEUED → RELOADING → SUCCEEDED | FAILED | EXCEEDED_LIMIT, or on
cancel CANCELING → CANCELED. What it keeps is bounded (reloads per app, the journal).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

from mqtt_starter.simulators.cloud.access import Access
from mqtt_starter.simulators.cloud.errors import ApiError
from mqtt_starter.simulators.cloud.fixtures import App, CloudFixture
from mqtt_starter.simulators.cloud.logs import ReloadLogs
from mqtt_starter.simulators.qrs.state import Faults, JournalEntry

ACTIVE = ("QUEUED", "RELOADING", "CANCELING")
RUNNING = ("RELOADING", "CANCELING")
RELOADS_PER_APP = 20


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _object_id() -> str:
    """Qlik Cloud's ids of reloads, items, spaces and collections: 24 hex digits."""
    return secrets.token_hex(12)


async def _either(first: asyncio.Event, second: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class CloudState:
    """Everything the simulated tenant knows: apps, reloads, logs, tokens, journal."""

    def __init__(self, fixture: CloudFixture) -> None:
        self.fixture = fixture
        self.spaces: dict[str, str] = {_object_id(): name for name in fixture.spaces}
        for app in fixture.apps:
            if app.space is not None and app.space not in self.spaces.values():
                self.spaces[_object_id()] = app.space
        tags = dict.fromkeys(t for app in fixture.apps for t in app.tags)
        self.collections: dict[str, str] = {_object_id(): tag for tag in tags}
        self.apps: dict[str, App] = {app.id: app for app in fixture.apps}
        self.item_ids: dict[str, str] = {app.id: _object_id() for app in fixture.apps}
        self.reloads: dict[str, dict[str, Any]] = {}
        self.reload_logs = ReloadLogs()
        self.logs = self.reload_logs.texts  # by reload id
        self.by_app: dict[str, deque[str]] = {app.id: deque() for app in fixture.apps}
        self.access = Access(fixture)
        self.tokens, self.scopeless = self.access.tokens, self.access.scopeless
        self.variants = fixture.variants
        self.posts: deque[float] = deque()  # monotonic times of reload POSTs in the window
        self.reloads_started = 0
        self.started: list[str] = []  # app id of every reload created, in order
        self.journal: list[JournalEntry] = []
        self.faults = Faults()
        self._runners: set[asyncio.Task[None]] = set()
        self._cancels: dict[str, asyncio.Event] = {}
        self._ended: dict[str, asyncio.Event] = {}  # of each active reload
        self._closing = asyncio.Event()

    @property
    def tokens_issued(self) -> int:
        return self.access.issued

    # -- lookups ------------------------------------------------------------------------------

    def space_id(self, name: str | None) -> str | None:
        return next((i for i, n in self.spaces.items() if n == name), None)

    def item(self, app: App) -> dict[str, Any]:
        return {
            "id": self.item_ids[app.id],
            "name": app.name,
            "resourceType": "app",
            "resourceId": app.id,
            "spaceId": self.space_id(app.space) or "",
            "ownerId": "sim-user",
            "collectionIds": [i for i, tag in self.collections.items() if tag in app.tags],
            "meta": {
                "tags": [
                    {"id": i, "name": tag} for i, tag in self.collections.items() if tag in app.tags
                ]
            },
        }

    # -- reloads ------------------------------------------------------------------------------

    def log_not_ready(self, reload_id: str) -> bool:
        return self.reload_logs.not_ready(reload_id, self.variants.log_ready_after_reads)

    def take_proxy_429(self) -> bool:
        if self.variants.proxy_429_next <= 0:
            return False
        self.variants = self.variants.model_copy(
            update={"proxy_429_next": self.variants.proxy_429_next - 1}
        )
        return True

    def start_reload(
        self,
        app_id: str,
        *,
        partial: bool = False,
        weight: int = 1,
        variables: Any = None,
        kind: str = "external",
    ) -> dict[str, Any]:
        """A reload of the app; `kind` is its `type`: `external` through the API, `hub` by a
        user, `chronos` by a schedule, `automations` by an automation."""
        app = self.apps.get(app_id)
        if app is None:
            raise ApiError(404, "RELOADS-001", "App not found", f"app {app_id} does not exist")
        now = time.monotonic()
        window = self.fixture.reload_window_s
        while self.posts and self.posts[0] <= now - window:
            self.posts.popleft()
        if len(self.posts) >= self.fixture.reload_limit:
            wait = math.ceil(self.posts[0] + window - now)
            raise ApiError(
                429,
                "HTTP-429",
                "API rate limit reached.",
                f"at most {self.fixture.reload_limit} reloads per {window:g} s",
                retry_after=max(1, wait),
            )
        self.posts.append(now)
        if not app.reloadable:
            raise ApiError(403, "RELOADS-003", "Not allowed", "you may not reload this app")
        quota = self.fixture.reload_quota
        if quota is not None and self.reloads_started >= quota:
            raise ApiError(403, "RELOADS-013", "Reload quota reached", "the tenant's quota")
        if any(self.reloads[r]["status"] == "QUEUED" for r in self.by_app[app_id]):
            raise ApiError(
                429,
                "RELOADS-007",
                "Too many requests",
                "a pending reload request already exists for this app",
            )
        # The reload it queues behind: the app's running one, if any.
        ahead = next((r for r in self.by_app[app_id] if self.reloads[r]["status"] in RUNNING), None)
        reload_id = _object_id()
        reload: dict[str, Any] = {
            "id": reload_id,
            "appId": app_id,
            "tenantId": "sim-tenant",
            "userId": "sim-user",
            "type": kind,
            "status": "QUEUED",
            "partial": partial,
            "weight": weight,
            "variables": variables or {},
            "creationTime": _now_iso(),
            "startTime": None,
            "endTime": None,
            "engineTime": None,
            "errorCode": "",
            "errorMessage": "",
            "log": "",
            "links": {},
        }
        reload["links"] = {"self": {"href": f"/api/v1/reloads/{reload_id}"}}
        self.reloads[reload_id] = reload
        history = self.by_app[app_id]
        history.append(reload_id)
        while len(history) > RELOADS_PER_APP:
            old = history.popleft()
            self.reloads.pop(old, None)
            self.logs.pop(old, None)
        self.reloads_started += 1
        self.started.append(app_id)
        self._cancels[reload_id] = asyncio.Event()
        self._ended[reload_id] = asyncio.Event()
        runner = asyncio.create_task(
            self._run(reload, app, self._ended.get(ahead) if ahead else None),
            name=f"cloud-reload-{reload_id}",
        )
        self._runners.add(runner)
        runner.add_done_callback(self._runners.discard)
        return reload

    def cancel(self, reload_id: str) -> bool:
        reload = self.reloads.get(reload_id)
        if reload is None or reload["status"] not in ("QUEUED", "RELOADING"):
            return False
        self._cancels[reload_id].set()
        return True

    async def _wait(self, reload_id: str, seconds: float) -> bool:
        """Wait `seconds`; True when a cancel cut it short."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._cancels[reload_id].wait(), seconds)
        return self._cancels[reload_id].is_set()

    async def _run(self, reload: dict[str, Any], app: App, ahead: asyncio.Event | None) -> None:
        outcome = app.outcome
        try:
            if ahead is not None:
                await _either(ahead, self._cancels[reload["id"]])
            if self._cancels[reload["id"]].is_set() or await self._wait(
                reload["id"], outcome.queue_s
            ):
                return await self._cancel(reload)
            reload["status"] = "RELOADING"
            reload["startTime"] = _now_iso()
            if await self._wait(reload["id"], outcome.duration_s):
                return await self._cancel(reload)
            status = {"success": "SUCCEEDED", "fail": "FAILED", "exceeded": "EXCEEDED_LIMIT"}
            reload["status"] = status[outcome.result]
            if outcome.result == "fail":
                reload["errorCode"] = outcome.error_code or "EDC_ERROR"
                reload["errorMessage"] = outcome.message or "The reload failed"
            self._end(reload, app)
        finally:
            self._cancels.pop(reload["id"], None)
            ended = self._ended.pop(reload["id"], None)
            if ended is not None:
                ended.set()

    async def _cancel(self, reload: dict[str, Any]) -> None:
        reload["status"] = "CANCELING"
        await asyncio.sleep(0.02)
        reload["status"] = "CANCELED"
        self._end(reload, self.apps[reload["appId"]])

    def _end(self, reload: dict[str, Any], app: App) -> None:
        reload["endTime"] = _now_iso()
        reload["startTime"] = reload["startTime"] or reload["endTime"]
        self.reload_logs.write(reload, app)

    # -- journal and lifecycle ----------------------------------------------------------------

    def record(self, entry: JournalEntry) -> None:
        limit = self.fixture.journal_limit
        if len(self.journal) >= limit:
            del self.journal[: limit // 2]
        self.journal.append(entry)

    def reset_journal(self) -> None:
        self.journal.clear()
        self.started.clear()

    async def pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def close(self) -> None:
        self._closing.set()
        runners = list(self._runners)
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
