"""A webhook receiver on loopback for the tests: a real aiohttp server that records each POST
and answers it with the next of its scripted answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.conftest import free_port


@dataclass
class Receiver:
    """Answers each POST with the next of `answers` (then 204): a status, or `hang` (waits
    for `release`, then 204). `hold` cleared makes every POST wait for it."""

    answers: list[int | str] = field(default_factory=list)
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append((dict(request.headers), await request.read()))
        answer = self.answers.pop(0) if self.answers else 204
        if answer == "hang":
            await self.release.wait()
            answer = 204
        assert isinstance(answer, int)
        if answer == 400:
            return web.Response(status=400, text="no such channel")
        return web.Response(status=answer, headers={"Retry-After": "0"} if answer == 503 else {})

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(b) for _, b in self.got]


@asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    """A receiver listening on a free loopback port, at `url`."""
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook/{token}", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    receiver.url = f"http://127.0.0.1:{port}/hook/t0ken"
    try:
        yield receiver
    finally:
        receiver.release.set()
        await runner.cleanup()
