"""The HTTP endpoint: health, readiness, metrics, Butler's REST start API, and the status page.

`PUT|POST /v4/reloadtask/{taskId}/start` is a door of the request service, like MQTT: it
translates the path and Butler's body into a Request and the Reply into Butler's answer;
the log line, metrics, status events and limits (`policy.max_payload_bytes`) are the service's.
Unlike Butler, each start is awaited, and a task matched by several selectors is started once
(and listed under each selector that matched it).

The status page (`GET /`) is one file with its CSS and script inline: nothing is fetched from
elsewhere. It gets a snapshot and then each change over Server-Sent Events (`GET /events`).
With `http.token` set, every route wants it as a bearer header (scripts). The page's own GET
routes also take a session cookie: a browser opens `/?token=...` once, which sets an HttpOnly,
SameSite=Strict cookie (a signed issue time, good for `http.session_max_age_s`) and redirects
to `/` (so the token does not stay in the address bar or the history).

The start route is where a page on another site could do harm (a form post, a `no-cors`
fetch, which carry cookies and no custom header): it takes the token only in the
Authorization header, a JSON body or none (no form or text body), and no `Origin` but its
own. Connections are guarded by http_guard.py (a cap below the file limit, a deadline to
finish a request).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web

from mqtt_starter.config import HttpSettings
from mqtt_starter.core.codec import decode_json, parse_butler_items
from mqtt_starter.core.errors import BadPayload, PayloadTooLarge, RequestError
from mqtt_starter.core.model import Reply, Request, Selector, SelectorKind, TaskResult
from mqtt_starter.doors.http_guard import ConnectionGuard, connection_cap
from mqtt_starter.doors.status_board import StatusBoard
from mqtt_starter.ops.metrics import CONTENT_TYPE, Metrics
from mqtt_starter.service.parts import Parts
from mqtt_starter.service.requests import Inbound, Starter, error_reply

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ReadyCheck = Callable[[], Awaitable[list[str]]]  # why the daemon is not ready; [] when it is
COOKIE = "mqtt_starter_token"
HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies from closing an idle page
# A page gets the changes at most this often, in one write: with many pages open during a
# burst of requests, one write per page per change would cost more than the requests.
PAGE_BATCH_S = 0.2


def _page() -> tuple[bytes, str]:
    """The page, and its Content-Security-Policy: only its own inline script and style run
    (by hash), and it connects only to this endpoint; an injected element could do nothing."""
    text = resources.files(__package__).joinpath("status_page.html").read_text("utf-8")

    def digest(tag: str) -> str:
        [body] = re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.S)
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    policy = (
        f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')};"
        " connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none';"
        " frame-ancestors 'none'"
    )
    return text.encode("utf-8"), policy


def butler_answer(reply: Reply) -> dict[str, Any]:
    """Butler's response body for a reply of the Starter."""
    started_by_id: list[dict[str, str]] = []
    denied_ids: list[dict[str, str]] = []
    tags: list[dict[str, str]] = []
    cps: list[dict[str, str]] = []
    denied_tags: list[dict[str, str]] = []
    denied_cps: list[dict[str, str]] = []
    for outcome in reply.outcomes:
        named = {"taskId": outcome.task.id, "taskName": outcome.task.name}
        for selector in outcome.matched_by:
            started = outcome.result is TaskResult.STARTED
            if selector.kind is SelectorKind.ID:
                # Butler's shape has no place for "running" or "disabled": not started is denied.
                (started_by_id if started else denied_ids).append(
                    named if started else {"taskId": outcome.task.id}
                )
            elif selector.kind is SelectorKind.TAG:
                if started:
                    tags.append(named)
                elif (
                    outcome.result is TaskResult.DENIED
                    and {"tag": selector.value} not in denied_tags
                ):
                    denied_tags.append({"tag": selector.value})
            elif selector.kind is SelectorKind.CUSTOM_PROPERTY:
                entry = {"name": selector.name, "value": selector.value}
                if started:
                    cps.append(named)
                elif outcome.result is TaskResult.DENIED and entry not in denied_cps:
                    denied_cps.append(entry)
    invalid = [
        {"taskId": u.selector.value} for u in reply.unmatched if u.selector.kind is SelectorKind.ID
    ]
    return {
        "tasksId": {"started": started_by_id, "invalid": invalid, "denied": denied_ids},
        "tasksTag": tags,
        "tasksTagDenied": denied_tags,
        "tasksCP": cps,
        "tasksCPDenied": denied_cps,
    }


PAGE_ROUTES = frozenset({"/", "/events", "/status.json"})
BROWSER_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})


def _refuse_cross_site(request: web.Request) -> None:
    """What a page on another site can send without a CORS preflight (a form, text, a foreign
    Origin) never starts a task; a script with the header token and JSON can."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise CrossSite(f"a start from another origin ({origin[:100]}) is refused")
    # The media types a page may send anywhere without asking first (CORS-safelisted).
    if request.content_type in BROWSER_TYPES or request.content_type.startswith("text/"):
        raise CrossSite(
            f"a {request.content_type} body is refused: send JSON"
            " (Content-Type: application/json), or no body"
        )


class CrossSite(RequestError):
    code = "forbidden"


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


# HTTP status of each refusal code; any other is 400.
_STATUS = {"payload_too_large": 413, "qrs_unavailable": 503, "internal": 500, "forbidden": 403}


async def _read_at_most(request: web.Request, limit: int) -> bytes:
    """The body, or its first `limit + 1` bytes: enough to tell that it is too large."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class HttpApi:
    def __init__(
        self,
        settings: HttpSettings,
        starter: Starter,
        parts: Callable[[], Parts],
        metrics: Metrics,
        not_ready: ReadyCheck,
        board: StatusBoard | None = None,
    ) -> None:
        self.settings = settings
        self._starter = starter
        self._parts = parts
        self._metrics = metrics
        self._not_ready = not_ready
        self._board = board
        self._runner: web.AppRunner | None = None
        self._closing = False
        self._page, self._policy = _page()
        self.port = settings.port
        self._server: asyncio.Server | None = None
        self.guard: ConnectionGuard | None = None

    @web.middleware
    async def _busy(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The connection serves a request: the guard does not count it as unfinished."""
        if self.guard is None:
            return await handler(request)
        self.guard.begin(request.transport)
        try:
            return await handler(request)
        finally:
            self.guard.end(request.transport)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        token = self.settings.token
        if token is None:
            return await handler(request)
        secret = token.get_secret_value()
        expected = f"Bearer {secret}".encode()
        given = request.headers.get("Authorization", "").encode()
        if hmac.compare_digest(given, expected):
            return await handler(request)
        if request.method == "GET" and request.path in PAGE_ROUTES:
            if self._session_valid(secret, request.cookies.get(COOKIE, "")):
                return await handler(request)
            offered = request.query.get("token")
            if (
                request.path == "/"
                and offered is not None
                and hmac.compare_digest(offered.encode(), secret.encode())
            ):
                response = web.Response(status=303, headers={"Location": "/"})
                response.set_cookie(
                    COOKIE,
                    self._session(secret),
                    httponly=True,
                    samesite="Strict",
                    path="/",
                    max_age=int(self.settings.session_max_age_s),
                )
                return response
        return _error(401, "unauthorized", "a valid bearer token is required")

    @staticmethod
    def _signature(secret: str, issued: str) -> str:
        return hmac.new(secret.encode(), issued.encode(), hashlib.sha256).hexdigest()

    def _session(self, secret: str) -> str:
        """A page session: its issue time, signed with the token (nothing to store)."""
        issued = str(int(time.time()))
        return f"{issued}.{self._signature(secret, issued)}"

    def _session_valid(self, secret: str, cookie: str) -> bool:
        issued, _, signature = cookie.partition(".")
        if not issued.isdigit() or not hmac.compare_digest(
            signature.encode(), self._signature(secret, issued).encode()
        ):
            return False
        return 0 <= time.time() - int(issued) < self.settings.session_max_age_s

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._page,
            content_type="text/html",
            charset="utf-8",
            headers={
                "Content-Security-Policy": self._policy,
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-store",
            },
        )

    async def status(self, request: web.Request) -> web.Response:
        assert self._board is not None
        return web.json_response(self._board.snapshot())

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: a snapshot, then each change; a new snapshot for a page that
        fell behind the board's ring of changes."""
        board = self._board
        assert board is not None
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        board.pages += 1
        try:
            seq, frame = board.snapshot_frame()
            await response.write(frame)
            while not self._closing:
                changes = await board.after(seq, HEARTBEAT_S)
                if self._closing:
                    break
                if changes is None:
                    seq, frame = board.snapshot_frame()
                    await response.write(frame)
                elif not changes[1]:
                    await response.write(b": still here\n\n")
                else:
                    seq = changes[0]
                    await response.write(changes[1])
                    await asyncio.sleep(PAGE_BATCH_S)
        except (ConnectionResetError, ConnectionError):
            pass  # the page was closed
        finally:
            board.pages -= 1
        return response

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        reasons = await self._not_ready()
        if reasons:
            return web.json_response({"status": "not ready", "reasons": reasons}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self._metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def start(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        where = f"{request.method} {request.path}"
        limit = self._parts().settings.policy.max_payload_bytes
        try:
            _refuse_cross_site(request)
            body = await _read_at_most(request, limit)
            selectors, must_exist = self._selectors(request, body, limit)
        except RequestError as exc:
            refusal = error_reply(None, exc.code, str(exc))
            self._starter.account("http", where, "http", refusal, started)
            return _error(_STATUS.get(exc.code, 400), exc.code, str(exc))
        reply = await self._starter.handle(
            Inbound(
                Request(tuple(selectors), all_task_ids_must_exist=must_exist),
                door="http",
                topic=where,
                kind="http",
            )
        )
        if reply.error is not None:
            code = reply.error.code
            return _error(_STATUS.get(code, 400), code, reply.error.message)
        return web.json_response(butler_answer(reply))

    @staticmethod
    def _selectors(request: web.Request, body: bytes, limit: int) -> tuple[list[Selector], bool]:
        flag = request.query.get("allTaskIdsMustExist", "false").lower()
        if flag not in ("true", "false"):
            raise BadPayload("allTaskIdsMustExist: expected true or false")
        if len(body) > limit:  # only limit + 1 bytes were read: the size itself is unknown
            raise PayloadTooLarge(f"payload is larger than {limit} bytes (the limit)")
        items: Any = decode_json(body, limit)
        if items is None:
            items = []
        if not isinstance(items, list):
            raise BadPayload("body must be a JSON array of {type, payload} items")
        selectors = parse_butler_items(items)
        task_id = request.match_info["taskId"]
        if task_id != "-":
            selectors.insert(0, Selector(SelectorKind.ID, task_id))
        if not selectors:
            raise BadPayload("no task id in the path and no items in the body")
        return selectors, flag == "true"

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._busy, self._auth])
        if self._board is not None:
            app.add_routes(
                [
                    web.get("/", self.page),
                    web.get("/events", self.events),
                    web.get("/status.json", self.status),
                ]
            )
        app.add_routes(
            [
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/metrics", self.metrics),
                web.put("/v4/reloadtask/{taskId}/start", self.start),
                web.post("/v4/reloadtask/{taskId}/start", self.start),
            ]
        )
        return app

    async def start_serving(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        assert self._runner.server is not None
        cap = connection_cap(self.settings.max_connections)
        self.guard = ConnectionGuard(
            self._runner.server, cap=cap, timeout_s=self.settings.request_timeout_s
        )
        self._server = await asyncio.get_running_loop().create_server(
            self.guard, self.settings.host, self.settings.port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        # Open pages end their streams at once (the browser reconnects to whatever serves
        # next); the server would otherwise wait for them until its shutdown timeout.
        self._closing = True
        if self._board is not None:
            self._board.wake_pages()
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
