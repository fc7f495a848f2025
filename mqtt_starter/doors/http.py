"""The HTTP endpoint: health, readiness, metrics, Butler's REST start (butler_rest.py) and the
status page (status_page.py), behind one guard against hostile clients (http_guard.py).

With `http.token` set, every route wants it as a bearer header (scripts). The page's own GET
routes also take a session cookie: a browser opens `/?token=...` once, which sets an HttpOnly,
SameSite=Strict cookie (a signed issue time, good for `http.session_max_age_s`) and redirects
to `/` (so the token does not stay in the address bar or the history). The start route takes
only the header.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ssl
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from mqtt_starter.config import HttpSettings
from mqtt_starter.core.errors import ConfigError
from mqtt_starter.doors.butler_rest import ButlerStart, json_error
from mqtt_starter.doors.http_guard import ConnectionGuard, connection_cap
from mqtt_starter.doors.status_board import StatusBoard
from mqtt_starter.doors.status_page import StatusPage
from mqtt_starter.ops.metrics import CONTENT_TYPE, Metrics
from mqtt_starter.service.parts import Parts
from mqtt_starter.service.requests import Starter

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ReadyCheck = Callable[[], Awaitable[list[str]]]  # why the daemon is not ready; [] when it is
COOKIE = "mqtt_starter_token"


PAGE_ROUTES = frozenset({"/", "/events", "/status.json"})


def server_tls(settings: HttpSettings) -> ssl.SSLContext | None:
    """The endpoint's TLS context (blocking: reads the files), None for plain HTTP; a file
    that cannot be used is a ConfigError naming its key."""
    tls = settings.tls
    if tls.cert_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except OSError as exc:  # ssl.SSLError is one
        where = f"{tls.cert_file} (with {tls.key_file})"
        raise ConfigError.unusable("http.tls.cert_file", where, exc) from None
    return context


class HttpApi:
    """The endpoint: its guard, the token and page sessions, health, readiness and metrics;
    the start route (butler_rest.py) and the status page (status_page.py)."""

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
        self.butler = ButlerStart(starter, parts)
        self.page = StatusPage(board, lambda: self._closing) if board is not None else None
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
        return json_error(401, "unauthorized", "a valid bearer token is required")

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

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._busy, self._auth])
        if self.page is not None:
            app.add_routes(self.page.routes())
        app.add_routes(
            [
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/metrics", self.metrics),
                *self.butler.routes(),
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
        context = await asyncio.to_thread(server_tls, self.settings)
        self._server = await asyncio.get_running_loop().create_server(
            self.guard, self.settings.host, self.settings.port, reuse_address=True, ssl=context
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
