"""The status page's routes: `GET /` (one file with its CSS and script inline: nothing is
fetched from elsewhere), `GET /events` (Server-Sent Events: a snapshot, then each change) and
`GET /status.json` (the snapshot, for scripts). What they show is the status board's.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections.abc import Callable
from importlib import resources

from aiohttp import web

from mqtt_starter.doors.status_board import StatusBoard

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


class StatusPage:
    """The page, its event stream and its snapshot; `closing` says the endpoint stops."""

    def __init__(self, board: StatusBoard, closing: Callable[[], bool]) -> None:
        self._board = board
        self._closing = closing
        self._page, self._policy = _page()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.page),
            web.get("/events", self.events),
            web.get("/status.json", self.status),
        ]

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
        return web.json_response(self._board.snapshot())

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: a snapshot, then each change; a new snapshot for a page that
        fell behind the board's ring of changes."""
        board = self._board
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
            while not self._closing():
                changes = await board.after(seq, HEARTBEAT_S)
                if self._closing():
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
