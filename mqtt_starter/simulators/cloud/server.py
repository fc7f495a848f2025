"""The Cloud simulator's HTTPS front: the API of qlik-cloud-api.md, faults and control endpoints.

Every `/api/v1` call is journaled, then faults apply, then the bearer (an API key or an unexpired
OAuth token; else 401). Lists page with `limit` (at most 100) and a cursor in
`links.next.href`. Errors have Qlik's shape, `{"errors": [{"code", "title", "detail"}]}`.
Control endpoints under /_sim (journal, faults) need no bearer.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

from aiohttp import web

from mqtt_starter.simulators.certs import CertPaths
from mqtt_starter.simulators.cloud.errors import ApiError
from mqtt_starter.simulators.cloud.fixtures import CloudFixture, CloudVariants
from mqtt_starter.simulators.cloud.state import CloudState
from mqtt_starter.simulators.qrs.server import server_ssl_context, set_faults_of, with_faults
from mqtt_starter.simulators.qrs.state import JournalEntry

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STATE_KEY = web.AppKey("cloud-state", CloudState)
MAX_LIMIT = 100


def _state(request: web.Request) -> CloudState:
    return request.config_dict[STATE_KEY]


def _error(exc: ApiError) -> web.Response:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return web.json_response(exc.body(), status=exc.status, headers=headers)


def _page(request: web.Request, data: list[dict[str, Any]]) -> web.Response:
    """One page of `data` with Qlik's cursor links."""
    try:
        limit = int(request.query.get("limit", "10"))
        start = int(request.query.get("next", "0"))
    except ValueError:
        raise ApiError(400, "HTTP-400", "Bad request", "limit and next are integers") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise ApiError(400, "HTTP-400", "Bad request", f"limit: 1 to {MAX_LIMIT}")
    page = data[start : start + limit]
    links: dict[str, Any] = {"self": {"href": str(request.rel_url)}}
    if start + limit < len(data):
        query = {k: v for k, v in request.query.items() if k != "next"}
        query["next"] = str(start + limit)
        links["next"] = {
            "href": f"{request.scheme}://{request.host}{request.path}?{urlencode(query)}"
        }
    return web.json_response({"data": page, "links": links})


# -- handlers -----------------------------------------------------------------------------------


async def token(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except json.JSONDecodeError:
        raise ApiError(400, "OAUTH-2", "invalid_request", "a JSON body") from None
    if not isinstance(body, dict) or body.get("grant_type") != "client_credentials":
        raise ApiError(400, "OAUTH-3", "unsupported_grant_type", "client_credentials only")
    scope = body.get("scope")
    return web.json_response(
        _state(request).access.issue_token(
            str(body.get("client_id")),
            str(body.get("client_secret")),
            scope if isinstance(scope, str) else "",
        )
    )


async def items(request: web.Request) -> web.Response:
    state = _state(request)
    query = request.query
    if query.get("resourceType", "app") != "app":
        return _page(request, [])
    apps = list(state.apps.values())
    if "name" in query:
        # A case-insensitive match that is not exact: callers compare names themselves.
        wanted = query["name"].casefold()
        apps = [a for a in apps if wanted in a.name.casefold()]
    if "spaceId" in query:
        apps = [a for a in apps if state.space_id(a.space) == query["spaceId"]]
    if "collectionId" in query:
        tag = state.collections.get(query["collectionId"])
        apps = [a for a in apps if tag is not None and tag in a.tags]
    ids = query.get("resourceIds") or query.get("resourceId")
    if ids is not None:
        wanted_ids = [i for i in ids.split(",") if i]
        if len(wanted_ids) > MAX_LIMIT:
            raise ApiError(400, "HTTP-400", "Bad request", f"resourceIds: at most {MAX_LIMIT}")
        apps = [a for a in apps if a.id in wanted_ids]
    return _page(request, [state.item(a) for a in apps])


async def collections(request: web.Request) -> web.Response:
    state = _state(request)
    if request.query.get("type", "public") != "public":
        return _page(request, [])
    name = request.query.get("name")
    found = [
        {"id": i, "name": tag, "type": "public", "itemCount": 0}
        for i, tag in state.collections.items()
        if name is None or tag == name  # public collection names: case-sensitive, unique
    ]
    return _page(request, found)


async def spaces(request: web.Request) -> web.Response:
    name = request.query.get("name")
    found = [
        {"id": i, "name": n, "type": "shared"}
        for i, n in _state(request).spaces.items()
        if name is None or n.casefold() == name.casefold()
    ]
    return _page(request, found)


async def app_info(request: web.Request) -> web.Response:
    state = _state(request)
    found = state.apps.get(request.match_info["id"])
    if found is None:
        raise ApiError(404, "APP-1", "Not found", "no such app")
    return web.json_response(
        {"attributes": {"id": found.id, "name": found.name, "spaceId": state.space_id(found.space)}}
    )


async def start_reload(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except json.JSONDecodeError:
        raise ApiError(400, "HTTP-400", "Bad request", "a JSON body") from None
    if not isinstance(body, dict) or not isinstance(body.get("appId"), str):
        raise ApiError(400, "HTTP-400", "Bad request", "appId is required")
    variables = body.get("variables")
    weight = body.get("weight", 1)
    if variables is not None and (
        not isinstance(variables, dict)
        or len(variables) > 20
        or any(not isinstance(v, str) or len(v) > 256 for v in variables.values())
    ):
        raise ApiError(400, "HTTP-400", "Bad request", "variables: up to 20, each at most 256")
    if not isinstance(weight, int) or not 1 <= weight <= 10:
        raise ApiError(400, "HTTP-400", "Bad request", "weight: 1 to 10")
    reload = _state(request).start_reload(
        body["appId"], partial=bool(body.get("partial", False)), weight=weight, variables=variables
    )
    return web.json_response(reload, status=201)


async def get_reload(request: web.Request) -> web.Response:
    reload = _state(request).reloads.get(request.match_info["id"])
    if reload is None:
        raise ApiError(404, "RELOADS-002", "Reload not found", "no such reload")
    return web.json_response(reload)


async def list_reloads(request: web.Request) -> web.Response:
    state = _state(request)
    app_id = request.query.get("appId")
    if app_id is None:
        raise ApiError(400, "HTTP-400", "Bad request", "appId is required (not a tenant admin)")
    found = [state.reloads[r] for r in reversed(state.by_app.get(app_id, ()))]
    text = request.query.get("filter")
    if text is not None:
        prefix, _, rest = text.strip("()").partition(" eq ")
        if prefix.strip() != "status" or not rest.startswith('"'):
            raise ApiError(400, "HTTP-400", "Bad request", 'filter: (status eq "...") only')
        found = [r for r in found if r["status"] == rest.strip('"')]
    return _page(request, found)


async def cancel_reload(request: web.Request) -> web.Response:
    state = _state(request)
    if request.match_info["id"] not in state.reloads:
        raise ApiError(404, "RELOADS-002", "Reload not found", "no such reload")
    if not state.cancel(request.match_info["id"]):
        raise ApiError(409, "RELOADS-010", "Conflict", "the reload cannot be canceled")
    return web.Response(status=202)


async def reload_log(request: web.Request) -> web.Response:
    state = _state(request)
    reload = state.reloads.get(request.match_info["id"])
    if reload is None or reload["appId"] != request.match_info["app"]:
        raise ApiError(404, "RELOADS-002", "Reload not found", "no such reload for this app")
    text = state.logs.get(reload["id"])
    if text is None or state.log_not_ready(reload["id"]):
        raise ApiError(404, "RELOADS-011", "Log not available", "the reload has not ended")
    return web.Response(text=text, content_type="text/plain")


async def reload_tasks(request: web.Request) -> web.Response:
    raise ApiError(410, "HTTP-410", "Gone", "/api/v1/reload-tasks is deprecated")


# -- middlewares -------------------------------------------------------------------------------


@web.middleware
async def journal(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/_sim/"):
        return await handler(request)
    state = _state(request)
    entry = JournalEntry(
        request.method,
        request.path,
        dict(parse_qsl(request.query_string, keep_blank_values=True)),
        started=time.monotonic(),
    )
    state.record(entry)
    try:
        response = await handler(request)
        entry.status = response.status
        return response
    except web.HTTPException as exc:
        entry.status = exc.status
        raise
    finally:
        entry.ended = time.monotonic()


@web.middleware
async def faults(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = _state(request)
    return await with_faults(
        state.faults,
        state.pause,
        request,
        handler,
        lambda status: _error(ApiError(status, "HTTP-503", "Service Unavailable")),
    )


PROXY_PAGE = "<html><body><h1>429 Too Many Requests</h1>nginx</body></html>"


@web.middleware
async def bearer(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = _state(request)
    if not request.path.startswith("/api/"):
        return await handler(request)
    if state.take_proxy_429():
        return web.Response(status=429, text=PROXY_PAGE, content_type="text/html")
    header = request.headers.get("Authorization")
    if not state.access.authorised(header):
        return _error(ApiError(401, "HTTP-401", "Unauthorized", "a valid bearer is required"))
    if not state.access.scoped(header):
        return _error(ApiError(403, "HTTP-403", "Forbidden", "the token has no scope"))
    return await handler(request)


@web.middleware
async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc)


# -- control ------------------------------------------------------------------------------------


async def get_journal(request: web.Request) -> web.Response:
    state = _state(request)
    return web.json_response(
        {
            "entries": [e.as_dict() for e in state.journal],
            "started": state.started,
            "tokensIssued": state.tokens_issued,
        }
    )


async def clear_journal(request: web.Request) -> web.Response:
    _state(request).reset_journal()
    return web.Response(status=204)


async def set_faults(request: web.Request) -> web.Response:
    return await set_faults_of(request, _state(request).faults)


async def set_variants(request: web.Request) -> web.Response:
    """POST /_sim/variants: any fields of `CloudVariants`; the variants after."""
    state = _state(request)
    try:
        body = await request.json()
        state.variants = CloudVariants.model_validate({**state.variants.model_dump(), **body})
    except (ValueError, TypeError) as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    return web.json_response(state.variants.model_dump())


async def reload_by_other(request: web.Request) -> web.Response:
    """POST /_sim/apps/{id}/reloads {"type": "hub"|"chronos"|"automations"}: a reload nobody
    started through the API."""
    body = await request.json()
    kind = body.get("type", "hub") if isinstance(body, dict) else "hub"
    reload = _state(request).start_reload(request.match_info["id"], kind=str(kind))
    return web.json_response(reload, status=201)


def build_app(state: CloudState) -> web.Application:
    app = web.Application(middlewares=[journal, api_errors, faults, bearer])
    app[STATE_KEY] = state
    app.add_routes(
        [
            web.post("/oauth/token", token),
            web.get("/api/v1/items", items),
            web.get("/api/v1/collections", collections),
            web.get("/api/v1/spaces", spaces),
            web.get("/api/v1/apps/{id}", app_info),
            web.post("/api/v1/reloads", start_reload),
            web.get("/api/v1/reloads", list_reloads),
            web.get("/api/v1/reloads/{id}", get_reload),
            web.post("/api/v1/reloads/{id}/actions/cancel", cancel_reload),
            web.get("/api/v1/apps/{app}/reloads/logs/{id}", reload_log),
            web.post("/api/v1/reload-tasks", reload_tasks),
            web.get("/_sim/journal", get_journal),
            web.delete("/_sim/journal", clear_journal),
            web.post("/_sim/faults", set_faults),
            web.post("/_sim/variants", set_variants),
            web.post("/_sim/apps/{id}/reloads", reload_by_other),
        ]
    )
    return app


class CloudSimulator:
    """A running tenant: `await sim.start()`, then `sim.url`, `sim.state`, `await sim.stop()`."""

    def __init__(
        self, fixture: CloudFixture, certs: CertPaths, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.fixture = fixture
        self.certs = certs
        self.host = host
        self.port = port
        self.state: CloudState | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    async def start(self) -> None:
        self.state = CloudState(self.fixture)
        context: ssl.SSLContext = server_ssl_context(self.certs, require_client_cert=False)
        self._runner = web.AppRunner(build_app(self.state), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self.state is not None:
            await self.state.close()
        if self._runner is not None:
            await self._runner.cleanup()
