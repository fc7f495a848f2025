"""The simulator's HTTPS front: QRS endpoints, the request rules, faults and control endpoints.

Order of checks on every /qrs call (qrs-api.md section 5): journal → faults → (proxy mode:
session cookie or bearer token) → xrfkey (403) → X-Qlik-User format (403) → empty query values
(400). Plain lists answer with the condensed entity, as real QRS does; only `/full` carries the
fields. Script logs are served through both generations of the call (or one, as the fixture
says), then downloaded once by their download id. Control endpoints under /_sim (journal,
faults, firing a scheduled run) sit outside /qrs and skip those rules.

Proxy mode stands for a JWT virtual proxy: a good bearer token opens a proxy session whose
cookie (`X-Qlik-Session-<prefix>`) later calls may present instead; a user may hold at most
`session_limit` sessions (a call that would open one more is refused with 403); a bad token is
answered as the proxy is set up: a redirect to its login page, 401, or an HTML page with 200.
"""

from __future__ import annotations

import contextlib
import json
import re
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote

from aiohttp import web

from mqtt_starter.simulators.certs import CertPaths
from mqtt_starter.simulators.qrs.filter_engine import DateReader, FilterError, evaluate, parse
from mqtt_starter.simulators.qrs.fixtures import Fixture, Variants
from mqtt_starter.simulators.qrs.results import EMPTY_GUID
from mqtt_starter.simulators.qrs.state import (
    Faults,
    JournalEntry,
    SimState,
    SimTask,
    StartRefused,
)

XSRF_TEXT = "XSRF prevention check failed. Possible XSRF discovered."
_XRFKEY = re.compile(r"^[0-9a-zA-Z]{16}$")
# Values may be percent-encoded (Qlik's docs ask for it); they are decoded for the journal.
_QLIK_USER = re.compile(r"^\s*UserDirectory=([^;=]+);\s?UserId=([^;=]+?)\s*$", re.IGNORECASE)
_BY_GUID = re.compile(
    r"^\s*(executionid|id)\s+eq\s+([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\s*$",
    re.IGNORECASE,
)
_BY_MODIFIED = re.compile(r"^\s*modifieddate\s+(?:gt|ge)\s+'([^'\\]*)'", re.IGNORECASE)
_TASK_KINDS = ("task", "reloadtask", "externalprogramtask")
ABOUT = {
    "buildVersion": "14.212.3",
    "buildDate": "11/29/2026 00:00:00",
    "databaseProvider": "Devart.Data.PostgreSql",
    "nodeType": 1,
    "sharedPersistence": True,
    "requiresBootstrap": False,
    "singleNodeOnly": False,
    "schemaPath": "About",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BadTokenAnswer = Literal["redirect", "401", "html"]


@dataclass
class Proxy:
    """A JWT virtual proxy in front of QRS: its token, its sessions, and how it refuses."""

    token: str
    prefix: str
    session_limit: int = 5
    bad_token: BadTokenAnswer = "redirect"
    # session cookie value → user; the simulator knows one user, the token's.
    sessions: dict[str, str] = field(default_factory=dict)

    cookie: str | None = None  # the admin's choice; none: X-Qlik-Session-<prefix>

    @property
    def cookie_name(self) -> str:
        if self.cookie:
            return self.cookie
        return "X-Qlik-Session" + (f"-{self.prefix.strip('/')}" if self.prefix else "")

    def user_sessions(self, user: str) -> int:
        return sum(1 for u in self.sessions.values() if u == user)


STATE_KEY = web.AppKey("state", SimState)
PREFIX_KEY = web.AppKey("prefix", str)
PROXY_KEY = web.AppKey("proxy", Proxy)  # absent: certificate mode


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain")


def _state(request: web.Request) -> SimState:
    return request.config_dict[STATE_KEY]


def _filtered(
    request: web.Request,
    objects: list[dict[str, Any]],
    read_date: DateReader | None = None,
) -> list[dict[str, Any]]:
    text = request.query.get("filter")
    if text is None:
        return objects
    try:
        node = parse(text)
    except FilterError as exc:
        raise web.HTTPBadRequest(text=exc.message) from None
    return [o for o in objects if evaluate(node, o, read_date)]


def _task(request: web.Request) -> SimTask:
    task = _state(request).tasks.get(request.match_info["id"].lower())
    if task is None:
        raise web.HTTPNotFound(text=f"Task {request.match_info['id']} not found")
    return task


# -- /qrs handlers ---------------------------------------------------------------------------


async def about(request: web.Request) -> web.Response:
    return web.json_response(ABOUT)


async def list_tasks(request: web.Request) -> web.Response:
    kind, tail = request.match_info["kind"], request.match_info.get("tail", "")
    if kind not in _TASK_KINDS or tail not in ("", "/full", "/count"):
        raise web.HTTPNotFound(text="Not found")
    objects = _filtered(request, _state(request).task_objects(kind, full=True))
    if tail == "/count":
        return web.json_response({"value": len(objects)})
    if tail == "":
        full_ids = {o["id"] for o in objects}
        objects = [o for o in _state(request).task_objects(kind, full=False) if o["id"] in full_ids]
    return web.json_response(objects)


async def task_by_id(request: web.Request) -> web.Response:
    kind = request.match_info["kind"]
    if kind == "task":
        # qrs-api.md: GET /qrs/task/{id} does not exist.
        raise web.HTTPNotFound(text="Not found")
    if kind not in _TASK_KINDS:
        raise web.HTTPNotFound(text="Not found")
    task = _task(request)
    if (kind == "reloadtask") != (task.spec.type == "reload"):
        raise web.HTTPNotFound(text=f"{kind} {task.id} not found")
    return web.json_response(task.full(_state(request).choice_values()))


def _start(request: web.Request, task: SimTask) -> web.Response:
    try:
        session = _state(request).start(task)
    except StartRefused as exc:
        return _text(exc.status, exc.text)
    if request.match_info.get("sync"):
        return web.json_response({"value": session}, status=201)
    return web.Response(status=204)


async def start_by_id(request: web.Request) -> web.Response:
    return _start(request, _task(request))


async def start_by_name(request: web.Request) -> web.Response:
    name = request.query.get("name")
    if name is None:
        raise web.HTTPBadRequest(text="Missing parameter value(s)")
    task = _state(request).find_by_name(name)
    if task is None:
        raise web.HTTPNotFound(text=f"Task {name} not found")
    return _start(request, task)


async def start_many(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except json.JSONDecodeError:
        raise web.HTTPBadRequest(text="Invalid body") from None
    if not isinstance(body, list) or not all(isinstance(i, str) for i in body):
        raise web.HTTPBadRequest(text="Invalid body")
    state = _state(request)
    for task_id in body:
        task = state.tasks.get(task_id.lower())
        if task is not None and task.spec.type != "usersync":
            state.start(task)
    return web.Response(status=204)


async def stop_task(request: web.Request) -> web.Response:
    _state(request).stop(_task(request))
    return web.Response(status=204)


async def delete_task(request: web.Request) -> web.Response:
    kind = request.match_info["kind"]
    task = _task(request)
    if kind not in ("reloadtask", "externalprogramtask") or (kind == "reloadtask") != (
        task.spec.type == "reload"
    ):
        raise web.HTTPNotFound(text="Not found")
    _state(request).delete(task)
    return web.Response(status=204)


def _reload_task(request: web.Request) -> SimTask:
    task = _task(request)
    if task.spec.type != "reload":
        raise web.HTTPNotFound(text=f"reloadtask {task.id} not found")
    return task


def _log_reference(
    request: web.Request, result: dict[str, Any] | None, *, bare: bool = False
) -> web.Response:
    """The download id of the result's script log (`{"value": ...}`, or with `bare` the
    string itself), 404 when there is none or it is not written yet."""
    task = _reload_task(request)
    state = _state(request)
    download = None
    if result is not None and result["taskID"] == task.id:
        if state.variants.log_not_ready_as == "404" and state.script_logs.not_ready(result["id"]):
            raise web.HTTPNotFound(text="Script log not found")
        download = state.script_logs.download(result["id"])
    if download is None:
        raise web.HTTPNotFound(text="Script log not found")
    return web.json_response(download if bare else {"value": download})


def _missing_call(state: SimState) -> web.Response:
    """How a log call this server does not offer answers (Variants.missing_log_call_status)."""
    status = state.variants.missing_log_call_status
    texts = {400: "Bad request", 404: "Not found", 405: "Method not allowed"}
    return _text(status, texts.get(status, "Internal server error"))


async def script_log_file(request: web.Request) -> web.Response:
    """The May 2025 generation: by execution result id."""
    state = _state(request)
    if state.script_log_api == "old":
        return _missing_call(state)
    result_id = request.query.get("executionResultId")
    if result_id is None:
        raise web.HTTPBadRequest(text="Missing parameter value(s)")
    return _log_reference(
        request,
        state.result_by_id.get(result_id.lower()),
        bare=state.variants.log_call_body == "string",
    )


async def script_log(request: web.Request) -> web.Response:
    """The older generation: by the result's fileReferenceID (never the empty GUID)."""
    state = _state(request)
    if state.script_log_api == "new":
        return _missing_call(state)
    reference = request.query.get("fileReferenceId")
    if reference is None:
        raise web.HTTPBadRequest(text="Missing parameter value(s)")
    result = (
        None if reference == EMPTY_GUID else state.results_book.by_file_reference(reference.lower())
    )
    return _log_reference(request, result)


async def download_log(request: web.Request) -> web.Response:
    state = _state(request)
    result_id = state.downloads.pop(request.match_info["download"].lower(), None)
    text = state.logs.get(result_id) if result_id is not None else None
    if text is None or result_id is None:
        raise web.HTTPNotFound(text="Not found")
    if state.script_logs.not_ready(result_id):
        if state.variants.log_not_ready_as == "404":
            raise web.HTTPNotFound(text="Not found")
        text = ""
    # Qlik documents the answer as byte[]: no media type or charset is promised.
    kind = state.variants.log_content_type
    body = text.encode("utf-8")
    if kind == "bom":
        body = b"\xef\xbb\xbf" + body
    content_type = {
        "octet-stream": "application/octet-stream",
        "bom": "application/octet-stream",
        "text": "text/plain",
        "text-charset": "text/plain; charset=utf-8",
    }[kind]
    return web.Response(body=body, headers={"Content-Type": content_type})


def _indexed_results(state: SimState, text: str | None) -> list[dict[str, Any]]:
    """The results a filter may select: by the index when it names one execution or result
    (what followers ask, thousands of times), else every kept result."""
    since = _BY_MODIFIED.match(text or "")
    if since is not None:
        return state.changes.since(since.group(1))
    match = _BY_GUID.match(text or "")
    if match is None:
        return state.results
    guid = match.group(2).lower()
    if match.group(1).lower() == "executionid":
        return state.results_of(guid)
    result = state.result_by_id.get(guid)
    return [result] if result is not None else []


def _user(request: web.Request) -> str:
    match = _QLIK_USER.match(request.headers.get("X-Qlik-User", ""))
    return f"{unquote(match.group(1))}\\{unquote(match.group(2))}" if match else ""


def _may_read_executions(request: web.Request) -> bool:
    return _user(request).casefold() not in _state(request).without_read_rights


async def execution_results(request: web.Request) -> web.Response:
    tail = request.match_info.get("tail", "")
    state = _state(request)
    # The filter still runs over the indexed candidates, so the answer is the engine's.
    objects = _filtered(
        request, _indexed_results(state, request.query.get("filter")), state.changes.filter_moment
    )
    if not _may_read_executions(request):
        objects = []  # QRS filters out what a user may not read: an empty list, no error
    if tail == "/count":
        return web.json_response({"value": len(objects)})
    if tail == "/full":
        return web.json_response(
            [{k: v for k, v in o.items() if not k.startswith("_")} for o in objects]
        )
    # The condensed ExecutionResult: no task, execution, status or details.
    return web.json_response([{"id": o["id"], "privileges": None} for o in objects])


async def execution_session(request: web.Request) -> web.Response:
    if not _may_read_executions(request):
        return _text(403, "Forbidden")
    session = _state(request).sessions.get(request.match_info["id"].lower())
    if session is None:
        raise web.HTTPNotFound(text="Not found")
    return web.json_response(
        {
            "id": session.id,
            "reloadTask": {"id": session.task.id},
            "schemaPath": "ExecutionSession",
        }
    )


# -- middlewares -------------------------------------------------------------------------------


@web.middleware
async def journal(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = _state(request)
    path = request.path[len(request.app[PREFIX_KEY]) :] if request.app[PREFIX_KEY] else request.path
    entry = JournalEntry(
        request.method,
        path,
        dict(parse_qsl(request.query_string, keep_blank_values=True)),
        started=time.monotonic(),
    )
    state.record(entry)
    entry.user = _user(request)
    state.in_flight += 1
    state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
    try:
        response = await handler(request)
        entry.status = response.status
        return response
    except web.HTTPException as exc:
        entry.status = exc.status
        raise
    finally:
        state.in_flight -= 1
        entry.ended = time.monotonic()


async def with_faults(
    faults: Faults,
    pause: Callable[[float], Awaitable[None]],
    request: web.Request,
    handler: Handler,
    failure: Callable[[int], web.Response],
) -> web.StreamResponse:
    """Serve `request` through the faults set for it (both simulators use this); `failure`
    is the answer of an injected error status."""
    if not faults.open.is_set():
        await faults.open.wait()
    if faults.delay_s:
        await pause(faults.delay_s)
    kind = faults.take(request.path)
    if kind == "fail":
        return failure(faults.fail_status)
    if kind == "hang":
        await pause(faults.hang_s)
    if kind == "drop":
        _drop(request)
    if kind == "lose":
        # The call takes effect; only its answer is lost.
        with contextlib.suppress(web.HTTPException):
            await handler(request)
        if faults.lose_as == "hang":
            await pause(faults.hang_s)
        if faults.lose_as in ("drop", "hang"):
            _drop(request)
        return failure(int(faults.lose_as))
    return await handler(request)


@web.middleware
async def faults(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = _state(request)
    return await with_faults(
        state.faults,
        state.pause,
        request,
        handler,
        lambda status: _text(status, "Service Unavailable (injected)"),
    )


async def set_faults_of(request: web.Request, faults: Faults) -> web.Response:
    """POST /_sim/faults: any of the fields of `Faults.FIELDS`."""
    settings = faults.update(await request.json())
    if settings is None:
        raise web.HTTPBadRequest(text=f"fields: {sorted(Faults.FIELDS)}")
    return web.json_response(settings)


def _drop(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()
    raise ConnectionResetError("connection dropped (injected)")


LOGIN_PAGE = (
    "<!DOCTYPE html><html><head><title>Qlik Sense</title></head>"
    "<body><form method='post'>Log in</form></body></html>"
)


async def login_page(request: web.Request) -> web.Response:
    return web.Response(text=LOGIN_PAGE, content_type="text/html")


def _refuse_token(request: web.Request, proxy: Proxy) -> web.Response:
    if proxy.bad_token == "401":
        return _text(401, "Unauthorized")
    if proxy.bad_token == "html":
        return web.Response(text=LOGIN_PAGE, content_type="text/html")
    location = f"{proxy.prefix}/internal_forms_authentication/?targetId={uuid.uuid4()}"
    return web.Response(status=302, headers={"Location": location})


@web.middleware
async def proxy_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    proxy = request.app.get(PROXY_KEY)
    if proxy is None:
        return await handler(request)
    if request.cookies.get(proxy.cookie_name) in proxy.sessions:
        return await handler(request)
    if request.headers.get("Authorization") != f"Bearer {proxy.token}":
        return _refuse_token(request, proxy)
    user = "jwt-user"
    if proxy.user_sessions(user) >= proxy.session_limit:
        return _text(403, f"You have reached the limit of {proxy.session_limit} parallel sessions")
    cookie = uuid.uuid4().hex
    proxy.sessions[cookie] = user
    response = await handler(request)
    response.set_cookie(proxy.cookie_name, cookie, path="/", secure=True, httponly=True)
    return response


@web.middleware
async def qrs_rules(request: web.Request, handler: Handler) -> web.StreamResponse:
    params = parse_qsl(request.query_string, keep_blank_values=True)
    keys = [v for k, v in params if k.lower() == "xrfkey"]
    header = request.headers.get("X-Qlik-Xrfkey")
    if len(keys) != 1 or not _XRFKEY.match(keys[0]) or header != keys[0]:
        return _text(403, XSRF_TEXT)
    user = request.headers.get("X-Qlik-User")
    if user is not None and not _QLIK_USER.match(user):
        return _text(403, "Forbidden: malformed X-Qlik-User header")
    if any(v == "" for _, v in params):
        return _text(400, "Missing parameter value(s)")
    return await handler(request)


# -- control endpoints ---------------------------------------------------------------------------


async def get_journal(request: web.Request) -> web.Response:
    state = _state(request)
    return web.json_response(
        {
            "entries": [e.as_dict() for e in state.journal],
            "started": state.started,
            "scheduled": state.scheduled,
            "peakInFlight": state.peak_in_flight,
        }
    )


async def clear_journal(request: web.Request) -> web.Response:
    _state(request).reset_journal()
    return web.Response(status=204)


async def fire_task(request: web.Request) -> web.Response:
    """Start a task as its schedule would (runs nobody started through the API)."""
    state = _state(request)
    task = state.tasks.get(request.match_info["id"].lower())
    if task is None:
        raise web.HTTPNotFound(text="Not found")
    try:
        return web.json_response({"value": state.fire(task)}, status=201)
    except StartRefused as exc:
        return _text(exc.status, exc.text)


async def set_faults(request: web.Request) -> web.Response:
    return await set_faults_of(request, _state(request).faults)


async def set_variants(request: web.Request) -> web.Response:
    """POST /_sim/variants: any fields of `Variants` (qrs-api.md section 6); the variants after."""
    state = _state(request)
    try:
        body = await request.json()
        state.variants = Variants.model_validate({**state.variants.model_dump(), **body})
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise web.HTTPBadRequest(text=str(exc)) from None
    proxy = request.app.get(PROXY_KEY)
    if proxy is not None:
        proxy.cookie = state.variants.session_cookie
    return web.json_response(state.variants.model_dump())


def build_app(state: SimState, *, prefix: str = "", proxy: Proxy | None = None) -> web.Application:
    """The simulator's aiohttp application; `proxy` makes it a JWT virtual proxy."""
    qrs = web.Application(middlewares=[journal, faults, proxy_auth, qrs_rules])
    qrs[PREFIX_KEY] = prefix
    if proxy is not None:
        qrs[PROXY_KEY] = proxy
    qrs.add_routes(
        [
            web.get("/about", about),
            web.post("/task/start/many", start_many),
            web.post(r"/task/start{sync:(/synchronous)?}", start_by_name),
            web.post(r"/task/{id}/start{sync:(/synchronous)?}", start_by_id),
            web.post("/task/{id}/stop", stop_task),
            web.get("/reloadtask/{id}/scriptlogfile", script_log_file),
            web.get("/reloadtask/{id}/scriptlog", script_log),
            web.get("/download/reloadtask/{download}/{file}", download_log),
            web.delete("/{kind}/{id}", delete_task),
            web.get(r"/executionresult{tail:(/full|/count)?}", execution_results),
            web.get("/executionsession/{id}", execution_session),
            web.get(r"/{kind}{tail:(/full|/count)?}", list_tasks),
            web.get("/{kind}/{id}", task_by_id),
        ]
    )
    app = web.Application()
    app[STATE_KEY] = state
    if proxy is not None:
        app[PROXY_KEY] = proxy  # for the control endpoints
    app.add_routes(
        [
            web.get("/_sim/journal", get_journal),
            web.delete("/_sim/journal", clear_journal),
            web.post("/_sim/faults", set_faults),
            web.post("/_sim/variants", set_variants),
            web.post("/_sim/tasks/{id}/fire", fire_task),
            web.get(f"{prefix}/internal_forms_authentication/", login_page),
        ]
    )
    app.add_subapp(f"{prefix}/qrs", qrs)
    return app


def server_ssl_context(certs: CertPaths, *, require_client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.server, certs.server_key)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(certs.root)
    return context


class QrsSimulator:
    """A running simulator: `await sim.start()`, then `sim.url`, `sim.state`, `await sim.stop()`."""

    def __init__(
        self,
        fixture: Fixture,
        certs: CertPaths,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        prefix: str = "",
        token: str | None = None,
        session_limit: int = 5,
        bad_token: BadTokenAnswer = "redirect",
    ) -> None:
        self.fixture = fixture
        self.certs = certs
        self.host = host
        self.port = port
        self.prefix = prefix.rstrip("/")
        if self.prefix and not self.prefix.startswith("/"):
            self.prefix = "/" + self.prefix
        self.token = token
        self.proxy = (
            Proxy(token, self.prefix, session_limit=session_limit, bad_token=bad_token)
            if token
            else None
        )
        self.state: SimState | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._context: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}{self.prefix}"

    async def start(self) -> None:
        self.state = SimState(self.fixture)
        self.state.start_schedules()
        if self.proxy is not None:
            self.proxy.cookie = self.fixture.variants.session_cookie
        app = build_app(self.state, prefix=self.prefix, proxy=self.proxy)
        context = server_ssl_context(self.certs, require_client_cert=self.token is None)
        self._context = context
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self.port, ssl_context=context)
        await self._site.start()
        # Port 0 asks the kernel for a free port; the runner knows which one it got.
        self.port = int(self._runner.addresses[0][1])

    async def suspend(self) -> None:
        """Stop listening (new connections are refused); the state is kept for `resume`."""
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def resume(self) -> None:
        """Listen again on the same port."""
        assert self._runner is not None and self._site is None
        self._site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self._context)
        await self._site.start()

    async def stop(self) -> None:
        if self.state is not None:
            await self.state.close()
        if self._runner is not None:
            await self._runner.cleanup()
